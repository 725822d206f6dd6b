"""`maskcma push` against a stand-in Hub on 127.0.0.1 (no real Hub traffic).

The stand-in answers the routes huggingface_hub's `HfApi` uses for `create_repo`, `create_branch` and
`upload_folder` (read from huggingface_hub's `hf_api.py`, `_commit_api.py` and `lfs.py`):

- `POST /api/repos/create` (409 when the repo exists), `GET /api/models/{repo}` (repo info, used after a 401/403 on
  create), `POST /api/models/{repo}/branch/{branch}`;
- `POST /api/validate-yaml` (the README's metadata is checked before a commit);
- `POST /api/models/{repo}/preupload/{rev}`: `lfs` for `.safetensors` files, `regular` otherwise;
- `POST /{repo}.git/info/lfs/objects/batch` (basic transfer) and `PUT /lfs-upload/{oid}`;
- `POST /api/models/{repo}/commit/{rev}`: NDJSON header + `file` (base64) + `lfsFile` (sha256 oid) lines.

Xet storage (used when `hf_xet` is installed) needs a CAS service, so the tests switch it off and the LFS basic
transfer is exercised instead.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest
import torch
import yaml
from huggingface_hub import constants
from safetensors.torch import save_file

from transformers_maskcma.cli import main
from transformers_maskcma.hub_cards.push import HubPushError, check_export_folder, push_to_hub

TOKEN = "hf_stand_in_write_token"


class FakeHub:
    """State of the stand-in Hub: repositories, branches, stored LFS objects and every request received."""

    def __init__(self) -> None:
        self.repos: dict[str, dict] = {}
        self.lfs_objects: dict[str, bytes] = {}
        self.calls: list[tuple[str, str]] = []
        self.validated_readmes: list[str] = []
        self.commits: list[dict] = []
        self.refuse_create_with: int | None = None
        self.url = ""


def make_handler(hub: FakeHub):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # keep pytest output clean
            pass

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                data = b""
                while True:
                    size = int(self.rfile.readline().strip(), 16)
                    if size == 0:
                        self.rfile.readline()
                        return data
                    data += self.rfile.read(size)
                    self.rfile.readline()
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _send(self, status: int, payload=None, headers: dict | None = None) -> None:
            body = b"" if payload is None else (payload if isinstance(payload, bytes) else json.dumps(payload).encode())
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)

        def _authorised(self) -> bool:
            if self.headers.get("Authorization") == f"Bearer {TOKEN}":
                return True
            self._send(401, {"error": "Invalid credentials in Authorization header"})
            return False

        def _repo(self, path: str, marker: str) -> tuple[str, str]:
            """`/api/models/{ns}/{name}/{marker}/{rev}` → (repo id, revision)."""
            head, _, revision = path.partition(f"/{marker}/")
            return head[len("/api/models/") :], unquote(revision)

        def do_GET(self) -> None:
            path = urlparse(self.path).path
            hub.calls.append(("GET", path))
            if not self._authorised():
                return
            if path.startswith("/api/models/"):
                repo_id = path[len("/api/models/") :].split("/revision/")[0]
                if repo_id not in hub.repos:
                    return self._send(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
                return self._send(200, {"id": repo_id, "sha": "0" * 40, "private": hub.repos[repo_id]["private"]})
            self._send(404, {"error": f"no route {path}"})

        def do_PUT(self) -> None:
            path = urlparse(self.path).path
            hub.calls.append(("PUT", path))
            data = self._body()
            oid = path.rsplit("/", 1)[-1]
            if hashlib.sha256(data).hexdigest() != oid:
                return self._send(400, {"error": "content does not match its oid"})
            hub.lfs_objects[oid] = data
            self._send(200)

        def do_POST(self) -> None:
            path = urlparse(self.path).path
            hub.calls.append(("POST", path))
            data = self._body()
            if path == "/api/validate-yaml":
                content = json.loads(data)["content"]
                front = content.split("---")[1]
                if not isinstance(yaml.safe_load(front), dict):
                    return self._send(400, b"metadata is not a mapping")
                hub.validated_readmes.append(content)
                return self._send(200, {})
            if not self._authorised():
                return
            if path == "/api/repos/create":
                if hub.refuse_create_with is not None:
                    return self._send(hub.refuse_create_with, {"error": "You don't have the rights"})
                payload = json.loads(data)
                repo_id = f"{payload['organization']}/{payload['name']}"
                if repo_id in hub.repos:
                    exists = {"error": "You already created this model repo", "url": f"{hub.url}/{repo_id}"}
                    return self._send(409, exists)
                hub.repos[repo_id] = {
                    "private": payload.get("visibility") == "private",
                    "branches": {"main"},
                    "files": {},
                    "type": payload.get("type"),
                }
                return self._send(200, {"url": f"{hub.url}/{repo_id}"})
            if "/branch/" in path:
                repo_id, branch = self._repo(path, "branch")
                if repo_id not in hub.repos:
                    return self._send(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
                if branch in hub.repos[repo_id]["branches"]:
                    return self._send(409, {"error": "Reference already exists"})
                hub.repos[repo_id]["branches"].add(branch)
                return self._send(200, {})
            if "/preupload/" in path:
                repo_id, _ = self._repo(path, "preupload")
                if repo_id not in hub.repos:
                    return self._send(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
                files = json.loads(data)["files"]
                modes = [
                    {"path": f["path"], "uploadMode": "lfs" if f["path"].endswith(".safetensors") else "regular",
                     "shouldIgnore": False}
                    for f in files
                ]  # fmt: skip
                return self._send(200, {"files": modes})
            if path.endswith(".git/info/lfs/objects/batch"):
                objects = json.loads(data)["objects"]
                answer = [
                    {"oid": o["oid"], "size": o["size"],
                     "actions": {"upload": {"href": f"{hub.url}/lfs-upload/{o['oid']}"}}}
                    for o in objects
                ]  # fmt: skip
                return self._send(200, {"transfer": "basic", "objects": answer})
            if "/commit/" in path:
                repo_id, revision = self._repo(path, "commit")
                if repo_id not in hub.repos:
                    return self._send(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
                if revision not in hub.repos[repo_id]["branches"]:
                    return self._send(404, {"error": "Invalid rev id"}, {"X-Error-Code": "RevisionNotFound"})
                lines = [json.loads(line) for line in data.decode().splitlines() if line.strip()]
                header = lines[0]
                files = {}
                for line in lines[1:]:
                    value = line["value"]
                    if line["key"] == "file":
                        files[value["path"]] = base64.b64decode(value["content"])
                    elif line["key"] == "lfsFile":
                        if value["oid"] not in hub.lfs_objects:
                            return self._send(422, {"error": f"LFS object {value['oid']} was never uploaded"})
                        files[value["path"]] = hub.lfs_objects[value["oid"]]
                hub.commits.append({"repo": repo_id, "revision": revision, "header": header["value"], "files": files})
                hub.repos[repo_id]["files"].update(files)
                oid = hashlib.sha1(json.dumps(sorted(files)).encode()).hexdigest()
                return self._send(200, {"commitUrl": f"{hub.url}/{repo_id}/commit/{oid}", "commitOid": oid})
            self._send(404, {"error": f"no route {path}"})

    return Handler


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    hub = FakeHub()
    server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(hub))
    hub.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    # the tests reach only 127.0.0.1; offline mode (set for the whole suite) would block that too
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))  # no token file from the machine
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf_home" / "token"))
    yield hub
    server.shutdown()
    server.server_close()


@pytest.fixture
def export_dir(tmp_path) -> Path:
    """A small folder with what `maskcma export` writes (config, card, weights, remote code)."""
    folder = tmp_path / "export"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "maskcma", "auto_map": {}}))
    (folder / "README.md").write_text("---\nlicense: apache-2.0\nlibrary_name: transformers\n---\n# tiny\n")
    (folder / "modeling_maskcma.py").write_text("# remote code\n")
    save_file({"w": torch.arange(12, dtype=torch.float32).reshape(3, 4)}, folder / "model.safetensors")
    return folder


def folder_files(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in folder.rglob("*") if path.is_file()}


def test_push_creates_the_repo_and_uploads_every_file(fake_hub, export_dir):
    result = push_to_hub(
        export_dir, "alice/maskcma-tiny", private=True, commit_message="first release", token=TOKEN,
        endpoint=fake_hub.url,
    )  # fmt: skip
    repo = fake_hub.repos["alice/maskcma-tiny"]
    assert repo["private"] is True and repo["type"] == "model"
    assert repo["files"] == folder_files(export_dir)
    (commit,) = fake_hub.commits
    assert commit["header"]["summary"] == "first release" and commit["revision"] == "main"
    weights = (export_dir / "model.safetensors").read_bytes()
    assert fake_hub.lfs_objects == {hashlib.sha256(weights).hexdigest(): weights}  # weights went through LFS
    assert set(fake_hub.validated_readmes) == {(export_dir / "README.md").read_text()}  # card checked before commit
    assert result.revision == "main" and result.num_files == 4
    assert result.commit_url.startswith(f"{fake_hub.url}/alice/maskcma-tiny/commit/")
    assert result.repo_url == f"{fake_hub.url}/alice/maskcma-tiny"


def test_push_to_an_existing_repo_on_a_new_branch_with_the_cli(fake_hub, export_dir, monkeypatch, capsys):
    fake_hub.repos["alice/maskcma-tiny"] = {"private": False, "branches": {"main"}, "files": {}, "type": "model"}
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    code = main(["push", str(export_dir), "--repo-id", "alice/maskcma-tiny", "--revision", "v1.0",
                 "--commit-message", "add v1", "--endpoint", fake_hub.url])  # fmt: skip
    assert code == 0
    assert "v1.0" in fake_hub.repos["alice/maskcma-tiny"]["branches"]
    (commit,) = fake_hub.commits
    assert commit["revision"] == "v1.0" and commit["header"]["summary"] == "add v1"
    assert ("POST", "/api/models/alice/maskcma-tiny/branch/v1.0") in fake_hub.calls
    assert "Pushed 4 files" in capsys.readouterr().out


def test_missing_token_is_a_clear_error_before_any_request(fake_hub, export_dir, capsys):
    with pytest.raises(HubPushError, match="no Hugging Face token found to push to 'alice/m'.*hf auth login"):
        push_to_hub(export_dir, "alice/m", endpoint=fake_hub.url)
    assert fake_hub.calls == []
    code = main(["push", str(export_dir), "--repo-id", "alice/m", "--endpoint", fake_hub.url])
    assert code == 2 and "HF_TOKEN" in capsys.readouterr().err


def test_rejected_token_names_the_repo_and_how_to_log_in(fake_hub, export_dir):
    with pytest.raises(HubPushError, match=r"creating the repository 'alice/m'.*401 Unauthorized.*hf auth login"):
        push_to_hub(export_dir, "alice/m", token="hf_wrong", endpoint=fake_hub.url)
    assert fake_hub.commits == []


def test_namespace_without_write_access_is_a_clear_message(fake_hub, export_dir):
    fake_hub.refuse_create_with = 403  # e.g. a namespace the token cannot write to; the repo does not exist
    with pytest.raises(HubPushError, match=r"'bob/private-model'.*403 Forbidden.*write access"):
        push_to_hub(export_dir, "bob/private-model", token=TOKEN, endpoint=fake_hub.url)
    # huggingface_hub then asks whether the repo exists (it does not) and re-raises the creation error
    assert ("GET", "/api/models/bob/private-model") in fake_hub.calls
    assert fake_hub.commits == []


def test_missing_or_incomplete_folder_and_bad_repo_id(fake_hub, tmp_path, export_dir):
    with pytest.raises(FileNotFoundError, match="does not exist.*maskcma export"):
        push_to_hub(tmp_path / "absent", "alice/m", token=TOKEN, endpoint=fake_hub.url)
    (export_dir / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="not an export of `maskcma export`: missing model.safetensors"):
        check_export_folder(export_dir)
    save_file({"w": torch.zeros(1)}, export_dir / "model.safetensors")
    with pytest.raises(ValueError, match="needs a namespace"):
        push_to_hub(export_dir, "m", token=TOKEN, endpoint=fake_hub.url)
    with pytest.raises(ValueError, match="not a valid Hub repository id"):
        push_to_hub(export_dir, "alice/bad name", token=TOKEN, endpoint=fake_hub.url)
    assert fake_hub.calls == []
