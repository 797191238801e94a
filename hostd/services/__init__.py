"""Thin gRPC servicers: convert messages, call the manager, convert back."""
