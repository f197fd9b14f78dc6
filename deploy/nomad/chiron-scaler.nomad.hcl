# Chiron global scaler: every scaling interval it computes desired engine counts per role (from etcd membership,
# engine stats and the queue's waiting-time estimates) and applies them with Nomad's job scale API to the task
# groups engine-interactive / engine-mixed / engine-batch of job var.engine_job (chiron-engine.nomad.hcl).
#
# One allocation: a single writer of scale decisions. Driver: raw_exec (see chiron-engine.nomad.hcl).
#
# Nomad ACLs: the task gets a workload-identity token in NOMAD_TOKEN (identity { env = true }), which the scaler
# sends as X-Nomad-Token. Attach a policy granting read-job, read-job-scaling and scale-job on the engine job's
# namespace to this job (see README.md); without ACLs the token is ignored. The scaler addresses the namespace in
# NOMAD_NAMESPACE, which Nomad sets to this job's own: run it in the engine job's namespace.
#
# The --interactive / --mixed / --batch MIN:MAX limits below must match the engine groups' scaling blocks in
# chiron-engine.nomad.hcl (Nomad refuses counts outside those; tests/test_nomad.py checks they agree).

variable "datacenters" {
  type        = list(string)
  description = "Datacenters the scaler may run in."
  default     = ["dc1"]
}

variable "chiron_bin" {
  type        = string
  description = "Path of the `chiron` executable on the nodes."
  default     = "/opt/chiron/.venv/bin/chiron"
}

variable "etcd_address" {
  type        = string
  description = "etcd client endpoint HOST:PORT where engines register."
  default     = "127.0.0.1:2379"
}

variable "nomad_address" {
  type        = string
  description = "Nomad HTTP API the scaler calls (raw_exec: the local agent on the node)."
  default     = "http://127.0.0.1:4646"
}

variable "engine_job" {
  type        = string
  description = "Job id whose task groups the scaler sets (one group per role)."
  default     = "chiron-engine"
}

variable "scaling_interval_s" {
  type        = number
  description = "Period of the global scaling decision [s]."
  default     = 10
}

variable "scale_down_delay_s" {
  type        = number
  description = "How long a lower desired count must hold before the scaler scales a role down [s] (hysteresis)."
  default     = 120
}

variable "model_load_time_s" {
  type        = number
  description = "Time a new engine needs before it serves (placement, start, model load) [s]; sizes the over-provisioning."
  default     = 120
}

variable "gpu_budget" {
  type        = number
  description = "Most GPUs the engine fleet may use (one per engine)."
  default     = 56
}

variable "mixed_min" {
  type        = number
  description = "MIXED engines kept at least (the engine job's mixed_min must be the same). 1 is what every measured Chiron run keeps (docs/decisions/0036)."
  default     = 1
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
      data        = "{{ with pkiCert \"${var.vault_pki_issue}\" \"common_name=chiron-scaler.service.consul\" (env \"NOMAD_IP_grpc\" | printf \"ip_sans=%s\") }}{{ .Cert }}{{ .CA }}{{ .Key }}{{ end }}"
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

job "chiron-scaler" {
  datacenters = var.datacenters
  type        = "service"

  group "scaler" {
    count = 1

    network {
      port "grpc" {}
    }

    update {
      max_parallel     = 1
      health_check     = "checks"
      min_healthy_time = "5s"
      healthy_deadline = "3m"
      auto_revert      = true
    }

    service {
      provider = "consul"
      name     = "chiron-scaler"
      port     = "grpc"
      tags     = ["chiron", "scaler"]

      check {
        name         = "scaler-grpc-health"
        type         = "grpc"
        port         = "grpc"
        grpc_service = "chiron.v1.GlobalScaler"
        grpc_use_tls = var.tls
        interval     = "10s"
        timeout      = "2s"
      }
    }

    task "scaler" {
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

      identity {
        env = true
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
          "scaler",
          "--host", "${NOMAD_IP_grpc}",
          "--port", "${NOMAD_PORT_grpc}",
          "--etcd", var.etcd_address,
          "--queue", "${CHIRON_QUEUE_ADDRESS}",
          "--interval-s", "${var.scaling_interval_s}",
          "--scale-down-delay-s", "${var.scale_down_delay_s}",
          "--model-load-time-s", "${var.model_load_time_s}",
          "--gpu-budget", "${var.gpu_budget}",
          "--gpus-per-instance", "1",
          "--interactive", "1:16",
          "--mixed", "${var.mixed_min}:8",
          "--batch", "0:32",
          "--provider", "nomad",
          "--nomad-address", var.nomad_address,
          "--nomad-job", var.engine_job,
        ]
      }

      kill_signal  = "SIGTERM"
      kill_timeout = "15s"

      resources {
        cpu    = 1000
        memory = 1024
      }
    }
  }
}
