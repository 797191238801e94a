"""Processes: the table (manager), their output (output), fork/exec (spawn), gRPC (service)."""
