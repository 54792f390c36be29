"""`python -m balancer.cli`: the same CLI as the `vici-balancer` console script."""

from balancer.cli.app import main

main()
