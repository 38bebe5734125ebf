//! Federated client: join, pull tasks, train locally with MJP, upload; data partitioning.
