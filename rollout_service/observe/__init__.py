"""What an operator sees of a running service: the call being served (calls.py), its metrics, log
lines and traces."""
