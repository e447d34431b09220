"""Which passthrough read shows the live state a mutation is checked against (the
broker's drift check digests the same state)."""

from __future__ import annotations

from .models import Request

_AWS_READS = {
    "s3:PutObject": "s3:GetObject",
    "s3:DeleteObject": "s3:GetObject",
    "s3:PutBucketPolicy": "s3:GetBucketPolicy",
    "ec2:AuthorizeSecurityGroupIngress": "ec2:DescribeSecurityGroups",
    "ec2:RevokeSecurityGroupIngress": "ec2:DescribeSecurityGroups",
    "ec2:AuthorizeSecurityGroupEgress": "ec2:DescribeSecurityGroups",
    "ec2:RevokeSecurityGroupEgress": "ec2:DescribeSecurityGroups",
    "ec2:TerminateInstances": "ec2:DescribeInstances",
    "iam:AttachRolePolicy": "iam:ListAttachedRolePolicies",
    "iam:DetachRolePolicy": "iam:ListAttachedRolePolicies",
}


def state_read(mutation: Request) -> Request:
    """The read request for ``mutation``'s target."""
    if mutation.provider == "aws":
        operation = _AWS_READS.get(mutation.operation)
        if operation is None:
            raise ValueError(f"no live-state read is known for {mutation.operation!r}")
        return Request("aws", operation, mutation.target)
    if mutation.provider == "http":
        return Request("http", "GET", mutation.target)
    raise ValueError(f"the broker serves no live-state reads for provider {mutation.provider!r} yet")
