"""Chiron's cluster simulator: workloads (``simulator.workloads``) replayed in virtual time."""
