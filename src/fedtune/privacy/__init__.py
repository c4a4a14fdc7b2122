"""Privacy for federated rounds: secure aggregation (secagg, shamir, fixedpoint) and differential privacy."""
