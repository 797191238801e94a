"""guestd: the agent inside each moru guest (processes, files, metrics over gRPC).

Runs on the guest's python3 with only the stdlib, grpcio, protobuf, uvloop
(optional) and moru_proto: it must never import hostd, moru or images.
"""

__version__ = "0.1.0"
