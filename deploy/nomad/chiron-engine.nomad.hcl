# Chiron engine agents on GPU nodes: one task group per role, one A100 and one `chiron engine` per allocation.
#
# The global scaler (`chiron scaler --provider nomad --nomad-job chiron-engine`) owns the groups' counts: it calls
# Nomad's job scale API (POST /v1/job/chiron-engine/scale) per group, within each group's `scaling` min/max
# (Nomad refuses a count outside them with HTTP 400). Re-submit this file with `nomad job run -preserve-counts`
# so a spec update does not reset the counts the scaler chose to the `count` values below.
#
# Driver: raw_exec. The engine runs from a Python virtual environment installed on every GPU node
# (`pip install chiron-serving[vllm]` into var.chiron_bin's venv); the repository ships no container image.
# raw_exec has no filesystem isolation, so GPU isolation comes from the device reservation: Nomad's NVIDIA
# device plugin reserves one GPU per allocation and exports its UUID as NVIDIA_VISIBLE_DEVICES; the task copies
# it into CUDA_VISIBLE_DEVICES (CUDA accepts GPU UUIDs) before exec'ing the engine, so several engines on one
# node each see only their own GPU. raw_exec must be enabled on the clients (plugin "raw_exec" { config {
# enabled = true } }).
#
# Health: gRPC checks need the Consul service provider (Nomad's built-in provider checks only http and tcp).
# The check asks the server's overall health (grpc_service ""), the status the engine turns NOT_SERVING when it
# drains on SIGTERM. Routers find engines through etcd membership, not Consul; the check lets Nomad restart an
# engine that stopped answering (check_restart, after a grace period that covers the model load) and shows health
# to operators. The engine serves gRPC only once its model is loaded, so a starting engine reads as critical.

variable "datacenters" {
  type        = list(string)
  description = "Datacenters the engines may run in."
  default     = ["dc1"]
}

variable "model_dir" {
  type        = string
  description = "Hugging Face model directory on every GPU node (passed to `chiron engine --model`)."
  default     = "/opt/models/Meta-Llama-3-8B-Instruct"
}

variable "chiron_bin" {
  type        = string
  description = "Path of the `chiron` executable on the GPU nodes (inside the venv that has vLLM)."
  default     = "/opt/chiron/.venv/bin/chiron"
}

variable "etcd_address" {
  type        = string
  description = "etcd client endpoint HOST:PORT where engines register (key /chiron/v1/instances/<id>, under a lease)."
  default     = "127.0.0.1:2379"
}

variable "interactive_itl_slo_ms" {
  type        = number
  description = "ITL SLO the local autoscaler of INTERACTIVE and MIXED engines holds [ms]."
  default     = 50
}

variable "batch_itl_slo_ms" {
  type        = number
  description = "ITL SLO the local autoscaler of BATCH engines holds [ms]."
  default     = 500
}

variable "mixed_min" {
  type        = number
  description = "MIXED engines kept at least: the MIXED group's initial count and scaling min (the scaler job's mixed_min must be the same). 1 is what every measured Chiron run keeps (docs/decisions/0036)."
  default     = 1
}

variable "engine_args" {
  type        = string
  description = "Extra `chiron engine` arguments appended to every engine's command line (shell words; a later option wins over the same option before it), e.g. \"--max-num-batched-tokens 2048\", or \"--backend simulated --model llama-3-8b\" for a rehearsal without GPUs."
  default     = ""
}

variable "engine_cpu_mhz" {
  type        = number
  description = "CPU reserved per engine [MHz]."
  default     = 8000
}

variable "engine_memory_mb" {
  type        = number
  description = "Host memory reserved per engine [MiB] (vLLM's CPU swap space and KV offload of evicted requests live here)."
  default     = 65536
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
  # One task group per engine role: its initial count, the bounds the global scaler works within (the group's
  # `scaling` block), the ITL SLO its local autoscaler holds, and whether it leases batch work from the queue
  # (MIXED: interactive overflow plus batch; BATCH: batch only). `$${...}` stays `${...}` in the command line, for
  # Nomad's runtime interpolation.
  engine_roles = {
    interactive = { count = 1, min = 1, max = 16, itl_slo_ms = var.interactive_itl_slo_ms, queue_args = "" }
    mixed       = { count = var.mixed_min, min = var.mixed_min, max = 8, itl_slo_ms = var.interactive_itl_slo_ms, queue_args = "--queue $${CHIRON_QUEUE_ADDRESS} " }
    batch       = { count = 0, min = 0, max = 32, itl_slo_ms = var.batch_itl_slo_ms, queue_args = "--queue $${CHIRON_QUEUE_ADDRESS} " }
  }
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
      data        = "{{ with pkiCert \"${var.vault_pki_issue}\" \"common_name=chiron-engine.service.consul\" (env \"NOMAD_IP_grpc\" | printf \"ip_sans=%s\") }}{{ .Cert }}{{ .CA }}{{ .Key }}{{ end }}"
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

job "chiron-engine" {
  datacenters = var.datacenters
  type        = "service"

  # Groups engine-interactive, engine-mixed and engine-batch (local.engine_roles).
  dynamic "group" {
    for_each = local.engine_roles
    labels   = ["engine-${group.key}"]

    content {
      count = group.value.count

      # Bounds the global scaler works within; no `policy` block: Chiron's scaler, not the Nomad Autoscaler, decides.
      scaling {
        enabled = true
        min     = group.value.min
        max     = group.value.max
      }

      network {
        port "grpc" {}
      }

      # No deployments (max_parallel = 0): Nomad refuses a job scale request while the job has an active deployment
      # ("job scaling blocked due to active deployment", HTTP 400), and with deployments every scale-up would start
      # one that lasts a model load. The price: a changed spec replaces this group's allocations all at once.
      update {
        max_parallel = 0
      }

      restart {
        attempts = 2
        interval = "10m"
        delay    = "30s"
        mode     = "fail"
      }

      task "engine" {
        driver = "raw_exec"

        # BATCH and MIXED engines lease batch work from the queue: its address from Consul (service "chiron-queue").
        # The engine restarts when the queue moves.
        dynamic "template" {
          for_each = group.value.queue_args != "" ? [1] : []
          content {
            data        = "{{ range service \"chiron-queue\" }}CHIRON_QUEUE_ADDRESS={{ .Address }}:{{ .Port }}\n{{ end }}"
            destination = "local/queue.env"
            env         = true
            change_mode = "restart"
          }
        }

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

        # A task-level service: check_restart restarts this task, and its grace restarts with the task.
        service {
          provider = "consul"
          name     = "chiron-engine-${group.key}"
          port     = "grpc"
          tags     = ["chiron", "engine", "role-${group.key}"]

          check {
            name         = "engine-grpc-health"
            type         = "grpc"
            port         = "grpc"
            grpc_service = ""
            grpc_use_tls = var.tls
            interval     = "10s"
            timeout      = "2s"

            check_restart {
              limit = 3
              grace = "20m"
            }
          }
        }

        config {
          command = "/bin/sh"
          args = [
            "-c",
            "CUDA_VISIBLE_DEVICES=\"$NVIDIA_VISIBLE_DEVICES\" exec ${var.chiron_bin} engine --backend vllm --model ${var.model_dir} --role ${group.key} --host ${NOMAD_IP_grpc} --port ${NOMAD_PORT_grpc} --instance-id ${NOMAD_ALLOC_ID} --itl-slo-ms ${group.value.itl_slo_ms} --etcd ${var.etcd_address} ${group.value.queue_args}${var.engine_args}",
          ]
        }

        # The engine drains on SIGTERM (new requests UNAVAILABLE, running ones finish, at most 30 s; a BATCH or MIXED
        # engine returns its leased work to the queue, lease expiry at worst). shutdown_delay: the Consul service is
        # deregistered this long before SIGTERM.
        kill_signal    = "SIGTERM"
        kill_timeout   = "45s"
        shutdown_delay = "5s"

        resources {
          cpu    = var.engine_cpu_mhz
          memory = var.engine_memory_mb

          device "nvidia/gpu" {
            count = 1

            constraint {
              attribute = "${device.model}"
              operator  = "regexp"
              value     = "A100" # device.model as the NVIDIA plugin reports it, e.g. "A100-SXM4-80GB"
            }
          }
        }
      }
    }
  }
}
