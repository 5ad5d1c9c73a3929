"""A fake Hugging Face Hub on 127.0.0.1 for testing uploads with the real `huggingface_hub` client, offline.

It answers the endpoints `HfApi.create_repo`, `upload_folder` / `create_commit` (all files as "regular" git blobs,
base64 in the NDJSON commit payload) and the read side of `snapshot_download` / `hf_hub_download` call, keeps every
repo's files in memory, and logs any other request (recorded in `unknown`) so a client change is easy to diagnose::

    hub = FakeHub(token="hf_dummy").start()
    HfApi(endpoint=hub.url, token="hf_dummy").upload_folder(...)
    hub.files("dummy-user/model")  # {path: bytes}
    hub.stop()

`hub.fail_on = "/commit/"` answers `fail_status` (500) to every request whose path contains that string.
"""

import base64
import hashlib
import json
import logging
import re
import threading
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

logger = logging.getLogger(__name__)

REPO = r"(?P<repo>[^/]+/[^/]+)"
REV = r"(?P<rev>[^/]+)"


def git_blob_sha(data: bytes) -> str:
    """The git object id of a file: what the Hub sends as the ETag of a regular (non-LFS) file."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class FakeHub:
    """A stdlib `ThreadingHTTPServer` on an ephemeral loopback port, served from a daemon thread."""

    def __init__(self, token: str | None = None, namespace: str = "dummy-user"):
        self.token = token  # when set, writes and private reads need `Authorization: Bearer <token>`
        self.namespace = namespace  # the namespace of a repo created without one
        self.repos: dict[str, dict] = {}  # repo id -> {"private", "files": {path: bytes}, "sha", "commits"}
        self.requests: list[str] = []  # "METHOD /path" of every request, in order
        self.unknown: list[str] = []
        self.fail_on: str | None = None
        self.fail_status = 500
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("FakeHub is not started: call start() first.")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "FakeHub":
        handler = type("Handler", (_Handler,), {"hub": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), name="fake-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self):
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=5)
            self._server = None

    def files(self, repo_id: str) -> dict[str, bytes]:
        with self._lock:
            return dict(self.repos[repo_id]["files"])

    def __enter__(self) -> "FakeHub":
        return self.start()

    def __exit__(self, *exc):
        self.stop()


class _Handler(BaseHTTPRequestHandler):
    hub: FakeHub
    protocol_version = "HTTP/1.1"  # keep-alive, as the client's connection pool expects

    def log_message(self, format, *args):
        logger.debug("fake hub: " + format, *args)

    # ----------------------------------------------------------------------------------------------- plumbing

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0], 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            self.rfile.readline()
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(self, status: int, body: bytes = b"", content_type="application/json", headers: dict | None = None):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, payload, headers: dict | None = None):
        self._send(status, json.dumps(payload).encode(), headers=headers)

    def _error(self, status: int, message: str, code: str | None = None):
        # `huggingface_hub` maps X-Error-Code to RepositoryNotFoundError, EntryNotFoundError, ...
        self._json(status, {"error": message}, headers={"X-Error-Code": code} if code else None)

    def _authorized(self) -> bool:
        return self.hub.token is None or self.headers.get("Authorization") == f"Bearer {self.hub.token}"

    def _dispatch(self):
        body = self._body() if self.command in ("POST", "PUT") else b""
        parts = urlsplit(self.path)
        path, query = unquote(parts.path), parse_qs(parts.query)
        self.hub.requests.append(f"{self.command} {path}")
        if self.hub.fail_on is not None and self.hub.fail_on in path:
            return self._error(self.hub.fail_status, f"Internal Error (fake hub told to fail on {self.hub.fail_on!r})")
        for methods, pattern, route in ROUTES:
            match = re.fullmatch(pattern, path)
            if self.command in methods and match:
                return route(self, body=body, query=query, **match.groupdict())
        self.hub.unknown.append(f"{self.command} {self.path}")
        logger.warning("fake hub: no route for %s %s", self.command, self.path)
        self._error(404, f"Fake hub has no route for {self.command} {path}")

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _dispatch

    def _repo(self, repo: str, write: bool = False) -> dict | None:
        """The repo, or None after answering 401/404 like the Hub does."""
        state = self.hub.repos.get(repo)
        if (write or (state and state["private"])) and not self._authorized():
            self._error(401, "Invalid credentials in Authorization header", "RepoNotFound" if not write else None)
            return None
        if state is None:
            self._error(404, f"Repository not found: {repo}", "RepoNotFound")
        return state

    def _revision(self, state: dict, rev: str | None) -> bool:
        if rev in (None, "main", state["sha"]):
            return True
        self._error(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return False

    # ----------------------------------------------------------------------------------------------- routes

    def create_repo(self, body: bytes, query: dict):
        if not self._authorized():
            return self._error(401, "Invalid credentials in Authorization header")
        payload = json.loads(body)
        if payload.get("type", "model") != "model":
            self.hub.unknown.append(f"create_repo type={payload['type']}")
            return self._error(400, "The fake hub only has model repos")
        repo = f"{payload.get('organization') or self.hub.namespace}/{payload['name']}"
        url = f"{self.hub.url}/{repo}"
        with self.hub._lock:
            if repo in self.hub.repos:
                return self._json(409, {"error": "You already created this model repo", "url": url})
            sha = hashlib.sha1(repo.encode()).hexdigest()
            private = payload.get("visibility") == "private" or bool(payload.get("private"))
            self.hub.repos[repo] = {"private": private, "files": {}, "sha": sha, "commits": []}
        self._json(200, {"url": url, "name": repo, "id": sha[:24]})

    def validate_yaml(self, body: bytes, query: dict):
        content = json.loads(body)["content"]
        match = re.match(r"---\n(.*?)\n---", content, re.DOTALL)
        try:
            metadata = yaml.safe_load(match.group(1)) if match else {}
        except yaml.YAMLError as e:
            return self._json(400, {"errors": [{"message": f"Invalid YAML: {e}"}], "warnings": []})
        if metadata is not None and not isinstance(metadata, dict):
            return self._json(400, {"errors": [{"message": "Metadata must be a YAML mapping"}], "warnings": []})
        self._json(200, {"errors": [], "warnings": []})

    def preupload(self, body: bytes, query: dict, repo: str, rev: str):
        state = self._repo(repo, write=True)
        if state is None or not self._revision(state, rev):
            return
        files = json.loads(body)["files"]
        remote = state["files"]
        self._json(
            200,
            {
                "files": [
                    {
                        "path": f["path"],
                        "uploadMode": "regular",
                        "shouldIgnore": False,
                        "oid": git_blob_sha(remote[f["path"]]) if f["path"] in remote else None,
                    }
                    for f in files
                ]
            },
        )

    def commit(self, body: bytes, query: dict, repo: str, rev: str):
        state = self._repo(repo, write=True)
        if state is None or not self._revision(state, rev):
            return
        if "create_pr" in query:
            self.hub.unknown.append(f"commit with create_pr to {repo}")
            return self._error(400, "The fake hub does not do pull requests")
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        with self.hub._lock:
            files = dict(state["files"])
            summary = ""
            for item in lines:
                key, value = item["key"], item["value"]
                if key == "header":
                    summary = value.get("summary", "")
                elif key == "file" and value.get("encoding") == "base64":
                    files[value["path"]] = base64.b64decode(value["content"])
                elif key == "deletedFile":
                    files.pop(value["path"], None)
                elif key == "deletedFolder":
                    prefix = value["path"].rstrip("/") + "/"
                    files = {p: data for p, data in files.items() if not p.startswith(prefix)}
                else:
                    self.hub.unknown.append(f"commit operation {key}")
                    return self._error(400, f"The fake hub cannot commit a {key!r} operation")
            digest = hashlib.sha1(state["sha"].encode())
            for path in sorted(files):
                digest.update(path.encode() + b"\0" + git_blob_sha(files[path]).encode())
            state["files"], state["sha"] = files, digest.hexdigest()
            state["commits"].append({"oid": state["sha"], "summary": summary})
        self._json(
            200,
            {
                "success": True,
                "commitOid": state["sha"],
                "commitUrl": f"{self.hub.url}/{repo}/commit/{state['sha']}",
                "hookOutput": "",
                "pullRequestUrl": None,
            },
        )

    def model_info(self, body: bytes, query: dict, repo: str, rev: str | None = None):
        state = self._repo(repo)
        if state is None or not self._revision(state, rev):
            return
        self._json(
            200,
            {
                "id": repo,
                "modelId": repo,
                "sha": state["sha"],
                "private": state["private"],
                "tags": [],
                "siblings": [{"rfilename": path} for path in sorted(state["files"])],
                "lastModified": "2026-01-01T00:00:00.000Z",
            },
        )

    def tree(self, body: bytes, query: dict, repo: str, rev: str, path: str | None = None):
        state = self._repo(repo)
        if state is None or not self._revision(state, rev):
            return
        recursive = query.get("recursive", ["False"])[0].lower() == "true"
        prefix = f"{path.strip('/')}/" if path else ""
        entries, folders = [], set()
        for file_path, data in sorted(state["files"].items()):
            if not file_path.startswith(prefix):
                continue
            parents = file_path[len(prefix) :].split("/")[:-1]
            if recursive:
                entries.append({"type": "file", "path": file_path, "size": len(data), "oid": git_blob_sha(data)})
                folders.update(prefix + "/".join(parents[: i + 1]) for i in range(len(parents)))
            elif parents:
                folders.add(prefix + parents[0])
            else:
                entries.append({"type": "file", "path": file_path, "size": len(data), "oid": git_blob_sha(data)})
        entries += [{"type": "directory", "path": f, "oid": git_blob_sha(f.encode())} for f in sorted(folders)]
        self._json(200, entries)

    def resolve(self, body: bytes, query: dict, repo: str, rev: str, path: str):
        state = self._repo(repo)
        if state is None or not self._revision(state, rev):
            return
        headers = {"X-Repo-Commit": state["sha"]}
        if path not in state["files"]:
            return self._json(404, {"error": "Entry not found"}, headers={"X-Error-Code": "EntryNotFound", **headers})
        data = state["files"][path]
        headers.update({"ETag": f'"{git_blob_sha(data)}"', "Last-Modified": formatdate(usegmt=True)})
        self._send(200, data, content_type="application/octet-stream", headers=headers)


ROUTES = [
    (("POST",), r"/api/repos/create", _Handler.create_repo),
    (("POST",), r"/api/validate-yaml", _Handler.validate_yaml),
    (("POST",), rf"/api/models/{REPO}/preupload/{REV}", _Handler.preupload),
    (("POST",), rf"/api/models/{REPO}/commit/{REV}", _Handler.commit),
    (("GET",), rf"/api/models/{REPO}(?:/revision/{REV})?", _Handler.model_info),
    (("GET",), rf"/api/models/{REPO}/tree/{REV}(?:/(?P<path>.*))?", _Handler.tree),
    (("GET", "HEAD"), rf"/{REPO}/resolve/{REV}/(?P<path>.+)", _Handler.resolve),
]
