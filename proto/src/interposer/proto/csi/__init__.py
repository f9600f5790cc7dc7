"""The CSI v1 contract (package ``csi.v1``), generated from ``proto/csi/v1/csi.proto``.

Import the generated modules directly::

    from interposer.proto.csi import csi_pb2, csi_pb2_grpc

Never edit them by hand: change the .proto and run ``make proto``.
"""
