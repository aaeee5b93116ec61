"""A local Hugging Face Hub stand-in for tests: serves folders as repos on 127.0.0.1.

It answers the requests huggingface_hub makes (model_info, HEAD/GET on
/resolve/ with HTTP ranges) and counts the bytes and headers it sends, so tests
can prove that reading one block of a remote checkpoint transfers little.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote


@dataclass
class Repo:
    commits: dict[str, Path]  # sha -> folder
    refs: dict[str, str]  # branch/tag -> sha


@dataclass
class Log:
    requests: list[dict] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, **kw):
        with self.lock:
            self.requests.append(kw)

    def bytes_sent(self, path_contains: str = "") -> int:
        return sum(r["bytes"] for r in self.requests if path_contains in r["path"])

    def clear(self):
        with self.lock:
            self.requests.clear()


def fake_sha(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()


class HubServer:
    def __init__(self):
        self.repos: dict[str, Repo] = {}
        self.log = Log()
        self.redirect_files_to: str | None = None  # another server's URL: answer /resolve/ with a 302 there
        self.bytes_per_second: float | None = None  # throttle bodies, to stand in for a real network
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output quiet
                pass

            def do_HEAD(self):
                server._handle(self, head=True)

            def do_GET(self):
                server._handle(self, head=False)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def add_repo(self, repo_id: str, folder: Path, branch: str = "main", tags=(), sha: str | None = None) -> str:
        """Serve `folder` as a new commit of `repo_id` on `branch`; returns its sha."""
        sha = sha or fake_sha(f"{repo_id}:{folder}:{len(self.repos.get(repo_id, Repo({}, {})).commits)}")
        repo = self.repos.setdefault(repo_id, Repo({}, {}))
        repo.commits[sha] = Path(folder)
        repo.refs[branch] = sha
        for t in tags:
            repo.refs[t] = sha
        return sha

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()

    # ---- request handling ----------------------------------------------
    def _resolve(self, repo_id: str, rev: str):
        repo = self.repos.get(repo_id)
        if repo is None:
            return None, "RepoNotFound"
        sha = repo.refs.get(rev, rev if rev in repo.commits else None)
        if sha is None:
            return None, "RevisionNotFound"
        return sha, None

    def _handle(self, h: BaseHTTPRequestHandler, head: bool):
        path = unquote(h.path.split("?", 1)[0])
        auth = h.headers.get("Authorization")
        m = re.match(r"^/api/models/(.+?)(?:/revision/(.+))?$", path)
        if m:
            repo_id, rev = m.group(1), m.group(2) or "main"
            sha, err = self._resolve(repo_id, rev)
            if err:
                return self._error(h, path, err, auth)
            folder = self.repos[repo_id].commits[sha]
            files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
            body = json.dumps(
                {
                    "id": repo_id,
                    "modelId": repo_id,
                    "sha": sha,
                    "private": False,
                    "siblings": [{"rfilename": f} for f in files],
                }
            ).encode()
            return self._send(h, path, 200, body, {"Content-Type": "application/json"}, head, auth)
        m = re.match(r"^/(.+?)/resolve/([^/]+)/(.+)$", path)
        if m:
            repo_id, rev, filename = m.groups()
            sha, err = self._resolve(repo_id, rev)
            if err:
                return self._error(h, path, err, auth)
            f = self.repos[repo_id].commits[sha] / filename
            if not f.is_file():
                return self._error(h, path, "EntryNotFound", auth)
            if self.redirect_files_to and filename.endswith(".safetensors"):  # like the Hub's CDN redirects
                location = f"{self.redirect_files_to}/{repo_id}/resolve/{sha}/{filename}"
                return self._send(h, path, 302, b"", {"Location": location}, head, auth)
            size = f.stat().st_size
            etag = f'"{fake_sha(str(f) + str(size))}"'
            headers = {
                "X-Repo-Commit": sha,
                "ETag": etag,
                "Accept-Ranges": "bytes",
                "Content-Type": "application/octet-stream",
            }
            rng = h.headers.get("Range")
            if rng:
                rm = re.match(r"bytes=(\d+)-(\d*)", rng)
                start = int(rm.group(1))
                end = min(int(rm.group(2)) if rm.group(2) else size - 1, size - 1)
                if start >= size:
                    headers["Content-Range"] = f"bytes */{size}"
                    return self._send(h, path, 416, b"", headers, head, auth)
                with open(f, "rb") as fh:
                    fh.seek(start)
                    body = fh.read(end - start + 1)
                headers["Content-Range"] = f"bytes {start}-{end}/{size}"
                return self._send(h, path, 206, body, headers, head, auth)
            body = b"" if head else f.read_bytes()
            headers["Content-Length"] = str(size)
            return self._send(h, path, 200, body, headers, head, auth, length=size)
        return self._error(h, path, "NotFound", auth)

    def _error(self, h, path, code, auth):
        body = json.dumps({"error": code}).encode()
        self._send(h, path, 404, body, {"X-Error-Code": code, "Content-Type": "application/json"}, False, auth)

    def _send(self, h, path, status, body, headers, head, auth, length=None):
        h.send_response(status)
        for k, v in headers.items():
            if k != "Content-Length":
                h.send_header(k, v)
        h.send_header("Content-Length", str(length if length is not None else len(body)))
        sent = 0 if head else len(body)
        # logged before the body goes out, so a client that has its answer always finds the entry
        self.log.add(method="HEAD" if head else "GET", path=path, status=status, bytes=sent, auth=auth,
                     range=h.headers.get("Range"))
        h.end_headers()
        if sent and self.bytes_per_second:
            import time

            for i in range(0, sent, 1 << 20):
                chunk = body[i : i + (1 << 20)]
                h.wfile.write(chunk)
                time.sleep(len(chunk) / self.bytes_per_second)
        elif sent:
            h.wfile.write(body)


def env_for(server: HubServer, cache_dir: Path) -> dict:
    """Environment variables that point huggingface_hub at the stand-in."""
    return {
        "HF_ENDPOINT": server.url,
        "HF_HOME": str(cache_dir),
        "HF_HUB_CACHE": str(cache_dir / "hub"),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_OFFLINE": "0",
    }


if __name__ == "__main__":  # serve folders by hand: python tests/hub_server.py org/name=DIR ...
    import sys
    import time

    s = HubServer()
    for arg in sys.argv[1:]:
        rid, folder = arg.split("=", 1)
        print(rid, s.add_repo(rid, Path(folder)))
    print("HF_ENDPOINT=" + s.url, flush=True)
    while True:
        time.sleep(3600)
