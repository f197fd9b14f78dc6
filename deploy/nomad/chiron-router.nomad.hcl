# Chiron router: the clients' gRPC entry point. Interactive requests go to an INTERACTIVE engine (MIXED on
# overflow) found through etcd membership; batch requests go to the queue.
#
# The router listens on a static port (var.router_port) so clients and the gateway have a stable address; two
# routers on distinct nodes by default. Driver: raw_exec (see chiron-engine.nomad.hcl).
# The queue's address comes from Consul (service "chiron-queue") through a template; the router restarts when it
# moves. Health: gRPC check on chiron.v1.Router through Consul.

variable "datacenters" {
  type        = list(string)
  description = "Datacenters the routers may run in."
  default     = ["dc1"]
}

variable "chiron_bin" {
  type        = string
  description = "Path of the `chiron` executable on the nodes."
  default     = "/opt/chiron/.venv/bin/chiron"
}

variable "etcd_address" {
  type        = string
  description = "etcd client endpoint HOST:PORT where engines register (the router watches /chiron/v1/instances/)."
  default     = "127.0.0.1:2379"
}

variable "router_port" {
  type        = number
  description = "Static gRPC port of the router on each node."
  default     = 50050
}

variable "router_count" {
  type        = number
  description = "Number of routers (each on its own node)."
  default     = 2
}

job "chiron-router" {
  datacenters = var.datacenters
  type        = "service"

  group "router" {
    count = var.router_count

    constraint {
      operator = "distinct_hosts"
      value    = "true"
    }

    network {
      port "grpc" {
        static = var.router_port
      }
    }

    update {
      max_parallel     = 1
      health_check     = "checks"
      min_healthy_time = "10s"
      healthy_deadline = "3m"
      auto_revert      = true
    }

    service {
      provider = "consul"
      name     = "chiron-router"
      port     = "grpc"
      tags     = ["chiron", "router"]

      check {
        name         = "router-grpc-health"
        type         = "grpc"
        port         = "grpc"
        grpc_service = "chiron.v1.Router"
        grpc_use_tls = false
        interval     = "10s"
        timeout      = "2s"
      }
    }

    task "router" {
      driver = "raw_exec"

      # CHIRON_QUEUE_ADDRESS=host:port of the healthy queue; the task restarts when it changes.
      template {
        data        = "{{ range service \"chiron-queue\" }}CHIRON_QUEUE_ADDRESS={{ .Address }}:{{ .Port }}\n{{ end }}"
        destination = "local/queue.env"
        env         = true
        change_mode = "restart"
      }

      config {
        command = var.chiron_bin
        args = [
          "router",
          "--host", "${NOMAD_IP_grpc}",
          "--port", "${NOMAD_PORT_grpc}",
          "--etcd", var.etcd_address,
          "--queue", "${CHIRON_QUEUE_ADDRESS}",
        ]
      }

      kill_signal  = "SIGTERM"
      kill_timeout = "30s"

      resources {
        cpu    = 2000
        memory = 1024
      }
    }
  }
}
