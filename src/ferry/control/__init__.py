"""The control layer: every operation a user can ask of the cluster, with its checks.

The CLI and the REST API both call these functions, so the two never disagree. Each
operation checks first (changing nothing on bad input), then writes in one transaction.
"""
