"""Shared volumes and the files of VMs on them."""
