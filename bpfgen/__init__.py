"""bpfgen: compile declarative NodePort/ClusterIP service specs into eBPF datapaths."""

__version__ = "0.1.0"
