"""The generated rollout.v1 messages and stub, public: `from rollout_client.proto.rollout.v1 import
rollout_pb2, rollout_pb2_grpc` (the server and the tests import them from here). Written by
`make proto` from protos/ and never edited by hand."""
