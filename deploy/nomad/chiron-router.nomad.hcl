# Chiron router: the clients' gRPC entry point. Interactive requests go to an INTERACTIVE engine (MIXED on
# overflow) found through etcd membership; batch requests go to the queue.
#
# The router listens on a static port (var.router_port) so clients and the gateway have a stable address; two
# routers on distinct nodes by default (stateless and interchangeable: the gateways list every healthy router and
# fail over between them, as `chiron replay --router a:1,b:2` and the Node example do). Driver: raw_exec (see chiron-engine.nomad.hcl).
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

variable "tls" {
  type        = bool
  description = "Mutual TLS on every gRPC hop, with certificates from Vault's PKI secrets engine (see TLS.md)."
  default     = false
}

variable "vault_pki_issue" {
  type        = string
  description = "tls: Vault path that issues the services' certificates (PKI mount and role)."
  default     = "pki_int/issue/chiron"
}

variable "vault_pki_ca_chain" {
  type        = string
  description = "tls: Vault path of the CA chain (issuing CA and root) that verifies every peer."
  default     = "pki_int/cert/ca_chain"
}

variable "auth" {
  type        = bool
  description = "Require a bearer token from clients, the tokens read from Nomad variable nomad/jobs/chiron-router (see TLS.md)."
  default     = false
}

locals {
  # What every task renders when var.tls is on (TLS.md): its certificate, issued by Vault's PKI secrets engine for
  # the service's Consul name and the node's IP (the address peers dial), with the issuing CA and the key in one
  # file (pkiCert issues it once and again when it nears expiry; the task then restarts); the CA chain that
  # verifies every peer; and the CHIRON_TLS_* variables that name them.
  tls_templates = [
    {
      destination = "secrets/chiron.pem"
      env         = false
      data        = "{{ with pkiCert \"${var.vault_pki_issue}\" \"common_name=chiron-router.service.consul\" (env \"NOMAD_IP_grpc\" | printf \"ip_sans=%s\") }}{{ .Cert }}{{ .CA }}{{ .Key }}{{ end }}"
    },
    {
      destination = "secrets/ca.pem"
      env         = false
      data        = "{{ with secret \"${var.vault_pki_ca_chain}\" }}{{ .Data.ca_chain }}{{ end }}"
    },
    {
      destination = "secrets/tls.env"
      env         = true
      data        = "CHIRON_TLS_CERT={{ env \"NOMAD_SECRETS_DIR\" }}/chiron.pem\nCHIRON_TLS_KEY={{ env \"NOMAD_SECRETS_DIR\" }}/chiron.pem\nCHIRON_TLS_CA={{ env \"NOMAD_SECRETS_DIR\" }}/ca.pem\n"
    },
  ]
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
        grpc_use_tls = var.tls
        interval     = "10s"
        timeout      = "2s"
      }
    }

    task "router" {
      driver = "raw_exec"

      # TLS (var.tls): a Vault token for the certificate templates, then certificate, CA chain and CHIRON_TLS_*.
      dynamic "vault" {
        for_each = var.tls ? [1] : []
        content {
          change_mode = "restart"
        }
      }

      dynamic "template" {
        for_each = var.tls ? local.tls_templates : []
        content {
          data        = template.value.data
          destination = template.value.destination
          env         = template.value.env
          change_mode = "restart"
        }
      }

      # Bearer tokens (var.auth): CHIRON_AUTH_TOKENS, comma-separated, from the Nomad variable of this job
      # (nomad var put nomad/jobs/chiron-router auth_tokens=...); the task restarts when they change.
      dynamic "template" {
        for_each = var.auth ? [1] : []
        content {
          data        = "{{ with nomadVar \"nomad/jobs/chiron-router\" }}CHIRON_AUTH_TOKENS={{ .auth_tokens }}{{ end }}\n"
          destination = "secrets/auth.env"
          env         = true
          change_mode = "restart"
        }
      }

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
