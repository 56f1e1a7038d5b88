"""Frontend processes (``--grpc-frontends N``): gRPC served by N processes past one core.

Each process parses gRPC in its own interpreter and reaches the core through a privileged
local channel (records.py on the wire, remote_core.py in the frontend, pool.py in the
supervisor, daemon/frontend/frontend_link.py the core's end).
"""
