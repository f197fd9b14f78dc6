# Chiron gateway: the OpenAI-compatible HTTP API (completions, chat completions, models, Batch API) over the
# router. Stateless: files and batches live in the queue's store, so gateways can be added, moved or restarted
# freely; two on distinct nodes by default, each on a static HTTP port (var.gateway_port) behind the operator's
# load balancer. Driver: raw_exec (see chiron-engine.nomad.hcl).
# The routers' addresses come from Consul (service "chiron-router", all healthy instances, comma-separated)
# through a template; the gateway fails over between them and restarts when the list changes. Health: HTTP GET /health through Consul (HTTPS when var.tls is on).
#
# var.tokenizer: "simple" for simulated engines, else the model directory on the nodes (its Hugging Face
# tokenizer and chat template, the same model the engines serve).

variable "datacenters" {
  type        = list(string)
  description = "Datacenters the gateways may run in."
  default     = ["dc1"]
}

variable "chiron_bin" {
  type        = string
  description = "Path of the `chiron` executable on the nodes."
  default     = "/opt/chiron/.venv/bin/chiron"
}

variable "gateway_port" {
  type        = number
  description = "Static HTTP port of the gateway on each node."
  default     = 8000
}

variable "gateway_count" {
  type        = number
  description = "Number of gateways (each on its own node)."
  default     = 2
}

variable "tokenizer" {
  type        = string
  description = "'simple' (simulated engines) or the model directory on the nodes (real vLLM engines)."
  default     = "simple"
}

variable "max_body_bytes" {
  type        = number
  description = "Largest request body, Batch API uploads included [bytes]; larger ones get 413."
  default     = 68157440
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
  description = "Require a bearer token from clients, the tokens read from Nomad variable nomad/jobs/chiron-gateway (see TLS.md); the gateway passes the client's token on to the router, so give both jobs the same tokens."
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
      data        = "{{ with pkiCert \"${var.vault_pki_issue}\" \"common_name=chiron-gateway.service.consul\" (env \"NOMAD_IP_http\" | printf \"ip_sans=%s\") }}{{ .Cert }}{{ .CA }}{{ .Key }}{{ end }}"
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

job "chiron-gateway" {
  datacenters = var.datacenters
  type        = "service"

  group "gateway" {
    count = var.gateway_count

    constraint {
      operator = "distinct_hosts"
      value    = "true"
    }

    network {
      port "http" {
        static = var.gateway_port
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
      name     = "chiron-gateway"
      port     = "http"
      tags     = ["chiron", "gateway"]

      check {
        name            = "gateway-http-health"
        type            = "http"
        port            = "http"
        path            = "/health"
        protocol        = var.tls ? "https" : "http"
        tls_skip_verify = true # the check reads /health only; clients verify the certificate
        interval        = "10s"
        timeout         = "2s"
      }
    }

    task "gateway" {
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
      # (nomad var put nomad/jobs/chiron-gateway auth_tokens=...); the task restarts when they change.
      dynamic "template" {
        for_each = var.auth ? [1] : []
        content {
          data        = "{{ with nomadVar \"nomad/jobs/chiron-gateway\" }}CHIRON_AUTH_TOKENS={{ .auth_tokens }}{{ end }}\n"
          destination = "secrets/auth.env"
          env         = true
          change_mode = "restart"
        }
      }

      # CHIRON_ROUTER_ADDRESS=host:port,host:port,... of every healthy router: the gateway fails over between them
      # (a call UNAVAILABLE at one router is made at the next; a streamed request only before its first token) and
      # reconnects to one that comes back within a second. The task restarts when the list changes.
      template {
        data        = "{{ range $i, $s := service \"chiron-router\" }}{{ if eq $i 0 }}CHIRON_ROUTER_ADDRESS={{ else }},{{ end }}{{ $s.Address }}:{{ $s.Port }}{{ end }}\n"
        destination = "local/router.env"
        env         = true
        change_mode = "restart"
      }

      config {
        command = var.chiron_bin
        args = [
          "gateway",
          "--host", "${NOMAD_IP_http}",
          "--port", "${NOMAD_PORT_http}",
          "--router", "${CHIRON_ROUTER_ADDRESS}",
          "--tokenizer", var.tokenizer,
          "--max-body-bytes", "${var.max_body_bytes}",
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
