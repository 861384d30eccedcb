"""Evaluation: sampling n answers per problem, grading, and the paper's metrics with intervals."""
