//! gRPC coordinator: membership, rounds, sampling, aggregation, checkpoints, run directory, interception tap.
