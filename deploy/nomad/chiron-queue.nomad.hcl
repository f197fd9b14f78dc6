# Chiron queue: durable store of batch requests, handed to BATCH / idle MIXED engines by lease.
#
# One allocation (the store is a single SQLite file). The database lives in the allocation's ephemeral disk,
# marked sticky + migrate: a replacement allocation is placed on the same node when it can and otherwise gets the
# data copied over (best effort; a node that is lost for good loses the file). For stronger durability, point
# --db at a replicated or host-volume path on a pinned node.
#
# Driver: raw_exec (the `chiron` venv is installed on the node; see chiron-engine.nomad.hcl).
# Health: a gRPC check on the chiron.v1.Queue service through Consul (Nomad's own provider has no gRPC checks).
# The scaler and the router find the queue as the Consul service "chiron-queue".

variable "datacenters" {
  type        = list(string)
  description = "Datacenters the queue may run in."
  default     = ["dc1"]
}

variable "chiron_bin" {
  type        = string
  description = "Path of the `chiron` executable on the node."
  default     = "/opt/chiron/.venv/bin/chiron"
}

variable "models" {
  type        = string
  description = "Comma-separated models the queue accepts (empty: any)."
  default     = ""
}

variable "lease_timeout_s" {
  type        = number
  description = "Default lease visibility timeout [s]: work leased by an engine that died returns to the queue after this."
  default     = 60
}

variable "disk_mb" {
  type        = number
  description = "Ephemeral disk reserved for the SQLite store [MiB]."
  default     = 20480
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

locals {
  # What every task renders when var.tls is on (TLS.md): its certificate, issued by Vault's PKI secrets engine for
  # the service's Consul name and the node's IP (the address peers dial), with the issuing CA and the key in one
  # file (pkiCert issues it once and again when it nears expiry; the task then restarts); the CA chain that
  # verifies every peer; and the CHIRON_TLS_* variables that name them.
  tls_templates = [
    {
      destination = "secrets/chiron.pem"
      env         = false
      data        = "{{ with pkiCert \"${var.vault_pki_issue}\" \"common_name=chiron-queue.service.consul\" (env \"NOMAD_IP_grpc\" | printf \"ip_sans=%s\") }}{{ .Cert }}{{ .CA }}{{ .Key }}{{ end }}"
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

job "chiron-queue" {
  datacenters = var.datacenters
  type        = "service"

  group "queue" {
    count = 1

    network {
      port "grpc" {}
    }

    ephemeral_disk {
      size    = var.disk_mb
      sticky  = true
      migrate = true
    }

    # Never two queues on one store: stop the old allocation before starting its replacement.
    update {
      max_parallel     = 1
      health_check     = "checks"
      min_healthy_time = "5s"
      healthy_deadline = "3m"
    }

    service {
      provider = "consul"
      name     = "chiron-queue"
      port     = "grpc"
      tags     = ["chiron", "queue"]

      check {
        name         = "queue-grpc-health"
        type         = "grpc"
        port         = "grpc"
        grpc_service = "chiron.v1.Queue"
        grpc_use_tls = var.tls
        interval     = "10s"
        timeout      = "2s"
      }
    }

    task "queue" {
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

      config {
        command = var.chiron_bin
        args = [
          "queue",
          "--host", "${NOMAD_IP_grpc}",
          "--port", "${NOMAD_PORT_grpc}",
          "--db", "${NOMAD_ALLOC_DIR}/data/chiron-queue.db",
          "--models", var.models,
          "--lease-timeout-s", "${var.lease_timeout_s}",
        ]
      }

      kill_signal  = "SIGTERM"
      kill_timeout = "30s"

      resources {
        cpu    = 2000
        memory = 4096
      }
    }
  }
}
