"""Generated Python stubs of KEDA's external-scaler contract (protos/chiron/keda/externalscaler.proto, Apache-2.0)."""
