"""Asterisk Manager Interface: the wire codec and the balancer's AMI sessions."""
