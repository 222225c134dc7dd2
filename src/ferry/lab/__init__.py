"""The lab: a real multi-node cluster on one machine (network namespaces, etcd, agents)."""
