"""A small local stand-in for the Hugging Face Hub, for tests only.

It speaks just enough of the Hub HTTP API for `huggingface_hub` 2.x (and `transformers` on top of it) to
create a model repo, upload files to it through the *legacy* upload path (preupload -> LFS batch/PUT/verify ->
NDJSON commit) and download them back through the normal `hf_hub_download` / `snapshot_download` path
(`HEAD`/`GET .../resolve/...`, revision info, tree listing). Repos live on disk under a root folder given by the
caller; the server runs on 127.0.0.1 on a free port in a daemon thread (stdlib only).

Implemented (model repos only, `repo_id` is `name` or `namespace/name`):

- `POST /api/repos/create`: 200 with `{"url": ...}`, 409 if the repo exists (hf_hub maps it to `exist_ok`). A new
  repo gets an initial commit holding a `.gitattributes` with the usual LFS patterns, as on the Hub.
- `POST /api/validate-yaml` (`ModelCard.push_to_hub`): always accepted, the metadata is not checked.
- `GET /api/models/{repo_id}` and `GET /api/models/{repo_id}/revision/{revision}`: repo info (`sha`, `siblings`).
- `GET /api/models/{repo_id}/tree/{revision}[/{path}]` (`recursive=true|false`) and
  `POST /api/models/{repo_id}/paths-info/{revision}` (form or JSON `paths`).
- `POST /api/models/{repo_id}/preupload/{revision}`: `lfs` for paths matching the `.gitattributes` patterns of the
  revision, for samples holding a NUL byte and for files of 10 MB or more; `regular` otherwise. Returns the current
  blob `oid` of each path so hf_hub can skip no-op uploads.
- `POST /{repo_id}.git/info/lfs/objects/batch` (basic transfer), `PUT /__stub_lfs/{sha256}` (single-part upload,
  sha256 checked) and `POST /__stub_lfs/{sha256}/verify`.
- `POST /api/models/{repo_id}/commit/{revision}`: NDJSON `header`, `file` (base64), `lfsFile` (must be uploaded),
  `deletedFile`, `deletedFolder`; honours `parentCommit` (412 when stale).
- `HEAD`/`GET /{repo_id}/resolve/{revision}/{path}`: `ETag` (git blob sha1, or sha256 for LFS files),
  `X-Repo-Commit`, `X-Linked-Etag`/`X-Linked-Size` for LFS files, `Content-Length`. Missing things give 404 with
  `X-Error-Code` set to `RepoNotFound`, `RevisionNotFound` or `EntryNotFound`, which hf_hub turns into
  `RepositoryNotFoundError`, `RevisionNotFoundError` and `RemoteEntryNotFoundError`.

Not implemented: Xet storage (no `X-Xet-Hash` header is ever sent, so downloads use plain HTTP; uploads must be
forced off Xet on the client with `HF_HUB_DISABLE_XET`, see `fixtures.py`), multipart LFS, branches other than
`main` (a commit sha works as a revision, `create_pr` does not), dataset/space repos, auth (tokens are ignored),
HTTP range requests, chunked request bodies, pagination. Every other request is logged as a warning and answered
`501` with its method and path in a JSON `error` (and `X-Error-Message`), so a gap shows up in the test output
instead of as a confusing client error.

Commit ids are 40-character sha1 hex strings, computed over the parent id, the message and the file table.
"""

import base64
import fnmatch
import hashlib
import json
import logging
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

__all__ = ["HubStub"]

logger = logging.getLogger(__name__)

DEFAULT_GITATTRIBUTES_PATTERNS = ["*.bin", "*.pt", "*.pth", "*.ckpt", "*.h5", "*.msgpack", "*.onnx", "*.safetensors"]
LFS_SIZE_THRESHOLD = 10 * 1024 * 1024
_REPO = r"(?P<repo>[^/]+/[^/]+|[^/]+)"
_OPS = "revision|tree|preupload|commit|paths-info"
_API = re.compile(rf"^/api/models/{_REPO}(?:/(?P<op>{_OPS})/(?P<rev>[^/]+)(?:/(?P<path>.*))?)?$")
_RESOLVE = re.compile(rf"^/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")
_LFS_BATCH = re.compile(rf"^/{_REPO}\.git/info/lfs/objects/batch$")
_LFS_OBJECT = re.compile(r"^/__stub_lfs/(?P<oid>[0-9a-f]{64})(?P<verify>/verify)?$")


def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class _HubError(Exception):
    def __init__(self, status: int, code: str | None, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class HubStub:
    """On-disk repo store plus the HTTP server in front of it.

    Args:
        root (`str` or `Path`):
            Folder holding the repos (`<root>/repos/<repo_id>/`) and content-addressed blobs (`<root>/objects/`).

    Use as a context manager, or call `start()` / `stop()`. `endpoint` is the base URL to give to clients and
    `requests` records `(method, path)` of every request served, for assertions.
    """

    def __init__(self, root):
        self.root = Path(root)
        (self.root / "objects").mkdir(parents=True, exist_ok=True)
        self.requests: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self._server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="hub-stub", daemon=True
        )

    def start(self) -> "HubStub":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> "HubStub":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- storage ------------------------------------------------------------------------------------------------
    def _repo_dir(self, repo_id: str) -> Path:
        if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", repo_id) or ".." in repo_id:
            raise _HubError(400, None, f"invalid repo id {repo_id!r}")
        return self.root / "repos" / repo_id

    def _put_object(self, key: str, data: bytes) -> None:
        (self.root / "objects" / key).write_bytes(data)

    def _object(self, key: str) -> Path:
        return self.root / "objects" / key

    def _resolve(self, repo_id: str, revision: str) -> tuple[str, dict]:
        """Return `(commit_id, files)` for a revision, where `files` maps path -> entry dict."""
        repo = self._repo_dir(repo_id)
        if not (repo / "refs" / "main").is_file():
            raise _HubError(404, "RepoNotFound", f"Repository {repo_id} not found")
        revision = unquote(revision)
        sha = (repo / "refs" / "main").read_text() if revision == "main" else revision
        commit_file = repo / "commits" / f"{sha}.json"
        if not re.fullmatch(r"[0-9a-f]{40}", sha) or not commit_file.is_file():
            raise _HubError(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return sha, json.loads(commit_file.read_text())["files"]

    def _commit(self, repo_id: str, parent: str | None, message: str, files: dict) -> str:
        record = {"parent": parent, "message": message, "files": files}
        sha = hashlib.sha1(json.dumps(record, sort_keys=True).encode()).hexdigest()
        repo = self._repo_dir(repo_id)
        (repo / "commits").mkdir(parents=True, exist_ok=True)
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "commits" / f"{sha}.json").write_text(json.dumps(record, indent=1))
        (repo / "refs" / "main").write_text(sha)
        return sha

    def _regular_entry(self, data: bytes) -> dict:
        oid = _git_blob_sha1(data)
        self._put_object(oid, data)
        return {"oid": oid, "size": len(data), "lfs": None}

    def create_repo(self, repo_id: str) -> bool:
        """Create `repo_id` with an initial `.gitattributes` commit. Returns False if it already exists."""
        with self._lock:
            if (self._repo_dir(repo_id) / "refs" / "main").is_file():
                return False
            attrs = "".join(f"{p} filter=lfs diff=lfs merge=lfs -text\n" for p in DEFAULT_GITATTRIBUTES_PATTERNS)
            self._commit(repo_id, None, "initial commit", {".gitattributes": self._regular_entry(attrs.encode())})
            return True

    def apply_commit(self, repo_id: str, revision: str, lines: list[dict]) -> str:
        with self._lock:
            head, files = self._resolve(repo_id, revision)
            if unquote(revision) != "main":
                raise _HubError(400, None, "the stub only commits to 'main'")
            header = next((line["value"] for line in lines if line["key"] == "header"), {})
            if header.get("parentCommit") not in (None, head):
                raise _HubError(412, None, f"parentCommit {header['parentCommit']} is not the head {head}")
            files = dict(files)
            for line in lines:
                key, value = line["key"], line["value"]
                if key == "file":
                    files[value["path"]] = self._regular_entry(base64.b64decode(value["content"]))
                elif key == "lfsFile":
                    oid = value["oid"]
                    if not self._object(oid).is_file():
                        raise _HubError(400, None, f"LFS object {oid} for {value['path']} was never uploaded")
                    files[value["path"]] = {"oid": oid, "size": self._object(oid).stat().st_size, "lfs": oid}
                elif key == "deletedFile":
                    if files.pop(value["path"], None) is None:
                        raise _HubError(404, "EntryNotFound", f"cannot delete missing file {value['path']}")
                elif key == "deletedFolder":
                    prefix = value["path"].rstrip("/") + "/"
                    files = {p: e for p, e in files.items() if not p.startswith(prefix)}
                elif key != "header":
                    raise _HubError(400, None, f"unsupported commit operation {key!r}")
            message = header.get("summary", "") + "\n\n" + header.get("description", "")
            return self._commit(repo_id, head, message, files)


def _file_json(path: str, entry: dict) -> dict:
    out = {"type": "file", "path": path, "size": entry["size"], "oid": entry["oid"]}
    if entry["lfs"]:
        # On the Hub the tree `oid` of an LFS file is the sha1 of its pointer file; the stub reuses the sha256.
        out["lfs"] = {"oid": entry["lfs"], "size": entry["size"], "pointerSize": 134}
    return out


def _listing(files: dict, path: str, recursive: bool) -> list[dict]:
    prefix = path.strip("/") + "/" if path.strip("/") else ""
    if prefix and not any(p.startswith(prefix) for p in files):
        raise _HubError(404, "EntryNotFound", f"{path} does not exist")
    out, folders = [], set()
    for p, entry in sorted(files.items()):
        if not p.startswith(prefix):
            continue
        parts = p[len(prefix) :].split("/")
        for i in range(1, len(parts) if recursive else min(2, len(parts))):
            folders.add(prefix + "/".join(parts[:i]))
        if recursive or len(parts) == 1:
            out.append(_file_json(p, entry))
    fake_tree_oid = "0" * 40
    return [{"type": "directory", "path": f, "oid": fake_tree_oid} for f in sorted(folders)] + out


def _make_handler(stub: HubStub):
    class Handler(BaseHTTPRequestHandler):
        server_version = "HubStub/0.1"

        def log_message(self, fmt, *args):
            logger.debug("hub stub: " + fmt, *args)

        # -- plumbing -------------------------------------------------------------------------------------------
        def _body(self) -> bytes:
            if "Content-Length" not in self.headers:  # hf_hub always sends one; chunked bodies are not supported
                raise _HubError(411, None, f"hub stub: {self.command} {self.path} has no Content-Length")
            return self.rfile.read(int(self.headers["Content-Length"]))

        def _send(self, status: int, body: bytes = b"", headers: dict | None = None, ctype="application/json"):
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _json(self, obj, status: int = 200, headers: dict | None = None):
            self._send(status, json.dumps(obj).encode(), headers)

        def _dispatch(self):
            url = urlsplit(self.path)
            path, query = unquote(url.path), parse_qs(url.query)
            with stub._lock:
                stub.requests.append((self.command, url.path))
            try:
                for route in (self._api, self._download, self._lfs):
                    if route(path, query) is not False:
                        return
                logger.warning("hub stub: unsupported request %s %s", self.command, self.path)
                message = f"hub stub: not implemented: {self.command} {self.path}"
                self._json({"error": message}, 501, {"X-Error-Message": message})
            except _HubError as err:
                headers = {"X-Error-Message": err.message}
                if err.code:
                    headers["X-Error-Code"] = err.code
                self._json({"error": err.message}, err.status, headers)

        do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _dispatch

        # -- routes: each returns False when it does not match --------------------------------------------------
        def _api(self, path: str, query: dict):
            if path == "/api/repos/create" and self.command == "POST":
                payload = json.loads(self._body() or b"{}")
                if payload.get("type", "model") != "model":
                    raise _HubError(400, None, "the stub only hosts model repos")
                repo_id = "/".join(filter(None, [payload.get("organization"), payload["name"]]))
                created = stub.create_repo(repo_id)
                body = {"url": f"{stub.endpoint}/{repo_id}", "name": repo_id}
                return self._json(
                    body if created else {**body, "error": "You already created this model repo"},
                    200 if created else 409,
                )
            if path == "/api/validate-yaml" and self.command == "POST":
                self._body()
                return self._json({"errors": [], "warnings": []})  # model card metadata is not checked
            m = _API.match(path)
            if m is None:
                return False
            repo_id, op, rev, sub = m["repo"], m["op"], m["rev"] or "main", m["path"] or ""
            if op in (None, "revision") and self.command == "GET":
                sha, files = stub._resolve(repo_id, rev)
                siblings = [{"rfilename": p, "size": e["size"], "blobId": e["oid"]} for p, e in sorted(files.items())]
                return self._json(
                    {"id": repo_id, "modelId": repo_id, "sha": sha, "private": False, "siblings": siblings, "tags": []}
                )
            if op == "tree" and self.command == "GET":
                recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
                return self._json(_listing(stub._resolve(repo_id, rev)[1], sub, recursive))
            if op == "paths-info" and self.command == "POST":
                raw = self._body()
                if self.headers.get("Content-Type", "").startswith("application/json"):
                    paths = json.loads(raw)["paths"]
                else:
                    paths = parse_qs(raw.decode()).get("paths", [])
                files = stub._resolve(repo_id, rev)[1]
                out = [_file_json(p, files[p]) for p in paths if p in files]
                dirs = [p for p in paths if p not in files and any(f.startswith(p.rstrip("/") + "/") for f in files)]
                return self._json(out + [{"type": "directory", "path": p, "oid": "0" * 40} for p in dirs])
            if op == "preupload" and self.command == "POST":
                payload = json.loads(self._body())
                files = stub._resolve(repo_id, rev)[1]
                patterns = DEFAULT_GITATTRIBUTES_PATTERNS
                if ".gitattributes" in files:
                    text = stub._object(files[".gitattributes"]["oid"]).read_text()
                    patterns = [ln.split()[0] for ln in text.splitlines() if "filter=lfs" in ln]
                out = []
                for f in payload["files"]:
                    is_lfs = (
                        any(fnmatch.fnmatch(f["path"].rsplit("/", 1)[-1], p) for p in patterns)
                        or f["size"] >= LFS_SIZE_THRESHOLD
                        or b"\0" in base64.b64decode(f["sample"])
                    )
                    oid = files.get(f["path"], {}).get("oid")
                    out.append(
                        {
                            "path": f["path"],
                            "uploadMode": "lfs" if is_lfs else "regular",
                            "shouldIgnore": False,
                            "oid": oid,
                        }
                    )
                return self._json({"files": out, "commitOid": stub._resolve(repo_id, rev)[0]})
            if op == "commit" and self.command == "POST":
                lines = [json.loads(ln) for ln in self._body().splitlines() if ln.strip()]
                sha = stub.apply_commit(repo_id, rev, lines)
                return self._json(
                    {
                        "commitUrl": f"{stub.endpoint}/{repo_id}/commit/{sha}",
                        "commitOid": sha,
                        "pullRequestUrl": None,
                        "success": True,
                    }
                )
            return False

        def _download(self, path: str, query: dict):
            m = _RESOLVE.match(path)
            if m is None or self.command not in ("GET", "HEAD"):
                return False
            sha, files = stub._resolve(m["repo"], m["rev"])
            entry = files.get(m["path"])
            if entry is None:
                raise _HubError(404, "EntryNotFound", f"{m['path']} does not exist at {sha}")
            headers = {"ETag": f'"{entry["oid"]}"', "X-Repo-Commit": sha, "Accept-Ranges": "none"}
            if entry["lfs"]:
                headers.update({"X-Linked-Etag": f'"{entry["lfs"]}"', "X-Linked-Size": str(entry["size"])})
            data = b"" if self.command == "HEAD" else stub._object(entry["oid"]).read_bytes()
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(entry["size"]))
            for k, v in headers.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)

        def _lfs(self, path: str, query: dict):
            if (m := _LFS_BATCH.match(path)) and self.command == "POST":
                payload = json.loads(self._body())
                stub._resolve(m["repo"], "main")  # 404 RepoNotFound if missing
                objects = []
                for obj in payload["objects"]:
                    out = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
                    if not stub._object(obj["oid"]).is_file():
                        href = f"{stub.endpoint}/__stub_lfs/{obj['oid']}"
                        out["actions"] = {"upload": {"href": href}, "verify": {"href": f"{href}/verify"}}
                    objects.append(out)
                return self._json({"transfer": "basic", "objects": objects})
            m = _LFS_OBJECT.match(path)
            if m is None:
                return False
            if self.command == "PUT" and not m["verify"]:
                data = self._body()
                if hashlib.sha256(data).hexdigest() != m["oid"]:
                    raise _HubError(400, None, f"uploaded content does not hash to {m['oid']}")
                stub._put_object(m["oid"], data)
                return self._send(200)
            if self.command == "POST" and m["verify"]:
                payload = json.loads(self._body())
                obj = stub._object(m["oid"])
                if not obj.is_file() or obj.stat().st_size != payload["size"]:
                    raise _HubError(404, None, f"LFS object {m['oid']} missing or wrong size")
                return self._json({"success": True})
            return False

    return Handler
