"""Shared by the bench scripts: a free loopback port and a multipart body (standard library only)."""
import os
import socket
import subprocess
import time
import urllib.request
import uuid


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def multipart(fields, files):
    """(body, content type) of a multipart/form-data request: text `fields`, `files` by path."""
    boundary = uuid.uuid4().hex
    body = b""
    for k, v in fields.items():
        body += ("--%s\r\nContent-Disposition: form-data; name=\"%s\"\r\n\r\n%s\r\n" % (boundary, k, v)).encode()
    for k, path in files.items():
        with open(path, "rb") as f:
            data = f.read()
        body += ("--%s\r\nContent-Disposition: form-data; name=\"%s\"; filename=\"%s\"\r\n"
                 "Content-Type: application/octet-stream\r\n\r\n" % (boundary, k, os.path.basename(path))).encode()
        body += data + b"\r\n"
    body += ("--%s--\r\n" % boundary).encode()
    return body, "multipart/form-data; boundary=%s" % boundary


def start_service(argv, data_dir):
    """Starts `argv` (a `musetalk-sidecar serve` command line) on a free loopback port with
    `data_dir`, waits (20 s at most) for /readyz; returns (process, base URL)."""
    port = free_port()
    svc = subprocess.Popen(argv + ["--listen", "127.0.0.1:%d" % port, "--data-dir", data_dir],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = "http://127.0.0.1:%d" % port
    for _ in range(200):
        try:
            urllib.request.urlopen(base + "/readyz", timeout=1)
            break
        except Exception:  # noqa: BLE001 - not listening yet
            time.sleep(0.1)
    return svc, base
