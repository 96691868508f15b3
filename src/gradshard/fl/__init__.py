"""Federated-learning side of gradshard: data sets, client partitions and models for real training runs.

``gradshard.fl.data`` needs only numpy (scikit-learn is imported when the bundled digits set is loaded);
``gradshard.fl.models`` imports torch. Nothing is imported here, so ``import gradshard.fl`` stays cheap.
"""
