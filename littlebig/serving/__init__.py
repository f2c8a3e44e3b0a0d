"""Serving a repository: the Triton launcher, the supervisor, the load balancer, and the tools that check them under load and faults."""
