"""Azure OpenAI: OpenAI's bodies on Azure's paths (`AzureOpenAI(azure_endpoint=...)`).

`/openai/deployments/{deployment}/{chat/completions|completions|embeddings|...}?api-version=`
and the newer `/openai/v1/...` (Responses too). The key travels in `api-key` (or
`Authorization: Bearer` for Entra tokens). A deployment is priced as the model the
upstream's `deployments:` map names for it, else as a model of the deployment's own name
(deployments are often named after their model), else by the model the response names.
"""

from __future__ import annotations

import re
from functools import lru_cache

from proxy.shapes import openai
from proxy.shapes.base import Endpoint, Kind

_DEPLOYMENT = re.compile(r"deployments/([^/]+)/(.+)")


@lru_cache(maxsize=1024)
def classify(tail: str, method: str) -> Endpoint:
    m = _DEPLOYMENT.fullmatch(tail)
    if m is not None:
        ep = openai.classify(m.group(2), method)
        if ep.metered:
            return Endpoint(ep.name, ep.kind, ep.body, model=m.group(1))
        return Endpoint(tail, ep.kind, ep.body)
    if tail.lower().startswith("v1/"):
        ep = openai.classify(tail[3:], method)
        return ep if ep.metered or ep.name == openai.RETRIEVE else Endpoint(tail, ep.kind, ep.body)
    return Endpoint(tail, Kind.FREE if method != "POST" else Kind.UNPRICED, "none")


class AzureShape(openai.OpenAIShape):
    name = "azure"
    credential_headers = frozenset({"api-key", "authorization"})

    def endpoint(self, tail: str, method: str) -> Endpoint | None:
        return classify(tail, method)

    def upstream_url(self, base_url: str, prefix: str, path: str, query: str) -> str:
        """Azure's base URL is the resource's root (`https://NAME.openai.azure.com`)."""
        url = f"{base_url}/openai/{path}"
        return f"{url}?{query}" if query else url

    def credentials(self, api_key: str) -> dict[str, str]:
        return {"api-key": api_key}
