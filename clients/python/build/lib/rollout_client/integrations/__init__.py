"""Trainer adapters: rollout-service behind the rollout interfaces of verl and OpenRLHF.

Each module imports its trainer package (and torch) only when imported itself.
"""
