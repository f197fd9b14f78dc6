"""Tools: ``chiron certs`` (development certificates for mutual TLS) and ``chiron tiny-model`` (a tiny model
directory for the vllm backend on CPU)."""

from __future__ import annotations

from pathlib import Path

import click

from services.cli._common import console


@click.command()
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--host", "hosts", multiple=True, default=("127.0.0.1", "localhost", "::1"), show_default=True,
              help="IP address or DNS name the services are dialled at (repeat); goes into the server certificate.")
@click.option("--days", default=30, show_default=True, type=click.IntRange(1, 3650), help="Validity [days].")
def certs(directory, hosts, days) -> None:
    """Write a development CA (ca.pem, ca-key.pem), a certificate for the services (server.pem, server-key.pem:
    server and client use) and one for outside clients (client.pem, client-key.pem) into DIRECTORY, and print
    the variables that turn mutual TLS on. For a lab; production certificates come from your PKI
    (deploy/nomad/TLS.md)."""
    from services.common.security import write_dev_certificates

    try:
        paths = write_dev_certificates(directory, hosts, days)
    except OSError as e:
        raise click.ClickException(f"cannot write certificates to {directory}: {e}") from e
    console.print(f"wrote a CA and certificates for {', '.join(hosts)} (valid {days} days) to {directory}")
    console.print("services (every chiron process):")
    for var, name in (("CHIRON_TLS_CERT", "server"), ("CHIRON_TLS_KEY", "server_key"), ("CHIRON_TLS_CA", "ca")):
        console.print(f"  export {var}={paths[name].resolve()}", soft_wrap=True)
    console.print("outside clients: CHIRON_TLS_CERT / CHIRON_TLS_KEY of client.pem / client-key.pem, the same CHIRON_TLS_CA")


@click.command("tiny-model")
@click.argument("model_dir", type=click.Path(file_okay=False))
@click.option("--layers", default=2, show_default=True, help="Decoder layers.")
@click.option("--hidden-size", default=128, show_default=True, help="Hidden size (4 heads of hidden/4).")
@click.option("--vocab-size", default=1024, show_default=True, help="Vocabulary size [tokens].")
@click.option("--max-len", default=2048, show_default=True, help="Context length [tokens].")
def tiny_model(model_dir, layers, hidden_size, vocab_size, max_len) -> None:
    """Write a tiny Llama-architecture model directory (config only) for the vllm backend on CPU.

    Serve it with: chiron engine --backend vllm --model MODEL_DIR --load-format dummy (chiron up and chiron demo
    --backend vllm --model MODEL_DIR know it by its chiron-tiny-model.json marker and add that themselves).
    """
    from services.engine.vllm_backend import write_tiny_model

    d = write_tiny_model(model_dir, num_layers=layers, hidden_size=hidden_size, vocab_size=vocab_size,
                         max_position_embeddings=max_len)
    console.print(f"wrote {d}/config.json: {layers} layers, hidden {hidden_size}, vocab {vocab_size}, "
                  f"context {max_len} (random weights: --load-format dummy)")

