"""How bytes move between roles: trajectories and weights over the Ray object store or gRPC.

Generated protobuf/gRPC code for the keel.v1 contracts lives in `keel.transport.pb`.
"""
