"""Deployment packaging (AWS Lambda)."""
