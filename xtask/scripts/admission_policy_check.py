"""The ValidatingAdmissionPolicy deploy/cluster ships for the brokers' ServiceAccount,
evaluated offline with cel-python (the API server's CEL, not its code): it admits what
the Kubernetes executor sends (seb-agent/src/execute/kubernetes.rs `mint`: an empty
`seb-token-` Secret, then a TokenRequest bound to it for 600 s with no audiences), and
refuses what a stolen broker token would do instead. Reads the rendered YAML on stdin."""

import sys

import celpy
import yaml
from celpy import json_to_cel

BROKER = "system:serviceaccount:seb-system:seb-broker"

docs = [d for d in yaml.safe_load_all(sys.stdin) if d]
policy = next(d for d in docs if d.get("kind") == "ValidatingAdmissionPolicy")
env = celpy.Environment()
condition = env.program(env.compile(policy["spec"]["matchConditions"][0]["expression"]))
validations = [env.program(env.compile(v["expression"])) for v in policy["spec"]["validations"]]


def admitted(user, resource, operation, obj=None, old=None):
    activation = {
        "request": json_to_cel({"userInfo": {"username": user}, "resource": {"resource": resource},
                                "operation": operation}),
        "object": json_to_cel(obj),
        "oldObject": json_to_cel(old),
    }
    if not condition.evaluate(activation):
        return True
    return all(bool(v.evaluate(activation)) for v in validations)


own_secret = {"metadata": {"name": "seb-token-5f0c2a", "labels": {"seb.io/decision": "5f0c2a"}}, "type": "Opaque"}
token_request = {"spec": {"audiences": [], "expirationSeconds": 600,
                          "boundObjectRef": {"apiVersion": "v1", "kind": "Secret", "name": "seb-token-5f0c2a"}}}
cases = [
    ("the executor's Secret", True, admitted(BROKER, "secrets", "CREATE", own_secret)),
    ("its deletion", True, admitted(BROKER, "secrets", "DELETE", None, own_secret)),
    ("the executor's TokenRequest", True, admitted(BROKER, "serviceaccounts", "CREATE", token_request)),
    ("another Secret made", False, admitted(BROKER, "secrets", "CREATE", {"metadata": {"name": "tls"}})),
    ("another Secret deleted", False, admitted(BROKER, "secrets", "DELETE", None, {"metadata": {"name": "tls"}})),
    ("a seb-token- Secret with data", False,
     admitted(BROKER, "secrets", "CREATE", {**own_secret, "data": {"tls.key": "eA=="}})),
    ("a Secret updated", False, admitted(BROKER, "secrets", "UPDATE", own_secret, own_secret)),
    ("a day-long token", False, admitted(BROKER, "serviceaccounts", "CREATE",
                                         {"spec": {**token_request["spec"], "expirationSeconds": 86400}})),
    ("an unbound token", False, admitted(BROKER, "serviceaccounts", "CREATE", {"spec": {"expirationSeconds": 600}})),
    ("a token for another audience", False, admitted(BROKER, "serviceaccounts", "CREATE",
                                                     {"spec": {**token_request["spec"], "audiences": ["vault"]}})),
    ("anyone else's Secret", True, admitted("system:serviceaccount:prod:ci", "secrets", "CREATE",
                                            {"metadata": {"name": "tls"}})),
]
wrong = [f"{name}: {'admitted' if got else 'refused'}" for name, want, got in cases if want != got]
if wrong:
    sys.exit("deploy/cluster's admission policy for the brokers is wrong: " + "; ".join(wrong))
print(f"admission policy: {len(cases)} cases as intended")
