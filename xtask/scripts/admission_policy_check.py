"""The ValidatingAdmissionPolicy deploy/cluster ships for the brokers' ServiceAccount,
evaluated offline with cel-python (the API server's CEL, not its code): it admits what
the Kubernetes executor sends (seb-agent/src/execute/kubernetes.rs `mint`: an empty
`seb-token-` Secret, then a TokenRequest bound to it for 600 s with no audiences) as
admission sees it (the API server has filled in its own audiences by then:
pkg/registry/core/serviceaccount/storage/token.go), with the shipped ConfigMap as
params, and refuses what a stolen broker token would do instead. Reads the rendered YAML
on stdin."""

import sys

import celpy
from celpy import celtypes
import yaml
from celpy import json_to_cel

BROKER = "system:serviceaccount:seb-system:seb-broker"

docs = [d for d in yaml.safe_load_all(sys.stdin) if d]
policy = next(d for d in docs if d.get("kind") == "ValidatingAdmissionPolicy")
binding = next(d for d in docs if d.get("kind") == "ValidatingAdmissionPolicyBinding")
param_ref = binding["spec"]["paramRef"]
params = next(d for d in docs if d.get("kind") == "ConfigMap" and d["metadata"]["name"] == param_ref["name"]
              and d["metadata"]["namespace"] == param_ref["namespace"])
API_AUDIENCE = params["data"]["audiences"].split(" ")[0]
env = celpy.Environment()


def split(text, separator):
    """`string.split(separator)` of the CEL strings extension the API server loads
    (cel-go ext.Strings), which cel-python lacks."""
    return celtypes.ListType([celtypes.StringType(part) for part in str(text).split(str(separator))])


def program(expression):
    return env.program(env.compile(expression), functions={"split": split})


condition = program(policy["spec"]["matchConditions"][0]["expression"])
validations = [program(v["expression"]) for v in policy["spec"]["validations"]]


def admitted(user, resource, operation, obj=None, old=None):
    activation = {
        "request": json_to_cel({"userInfo": {"username": user}, "resource": {"resource": resource},
                                "operation": operation}),
        "object": json_to_cel(obj),
        "oldObject": json_to_cel(old),
        "params": json_to_cel(params),
    }
    if not condition.evaluate(activation):
        return True
    return all(bool(v.evaluate(activation)) for v in validations)


own_secret = {"metadata": {"name": "seb-token-5f0c2a", "labels": {"seb.io/decision": "5f0c2a"}}, "type": "Opaque"}
# As admission sees it: the executor sends no audiences, the API server fills in its own.
token_request = {"spec": {"audiences": [API_AUDIENCE], "expirationSeconds": 600,
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
    ("a token for the API server and another", False,
     admitted(BROKER, "serviceaccounts", "CREATE",
              {"spec": {**token_request["spec"], "audiences": [API_AUDIENCE, "sts.amazonaws.com"]}})),
    ("a token Secret for the controller to fill", False,
     admitted(BROKER, "secrets", "CREATE", {**own_secret, "type": "kubernetes.io/service-account-token"})),
    ("a Secret naming a ServiceAccount", False,
     admitted(BROKER, "secrets", "CREATE", {**own_secret, "metadata": {
         **own_secret["metadata"], "annotations": {"kubernetes.io/service-account.name": "deployer"}}})),
    ("anyone else's Secret", True, admitted("system:serviceaccount:prod:ci", "secrets", "CREATE",
                                            {"metadata": {"name": "tls"}})),
]
wrong = [f"{name}: {'admitted' if got else 'refused'}" for name, want, got in cases if want != got]
if wrong:
    sys.exit("deploy/cluster's admission policy for the brokers is wrong: " + "; ".join(wrong))
print(f"admission policy: {len(cases)} cases as intended")
