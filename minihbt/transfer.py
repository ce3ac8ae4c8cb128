"""Moving one file into place, verified: an HTTP(S) download resumed with Range requests, or
a copy (never a link) from a local mirror. Written to FILE.part and renamed only
once complete and, where a SHA-256 is pinned, checked."""
import hashlib
import http.client
import os
import re
import shutil
import sys
import urllib.request
from pathlib import Path
from urllib.error import HTTPError, URLError

from tqdm import tqdm

from .bars import progress_bar
from .files import sha256_file
from .sources import CHUNK, TIMEOUT, USER_AGENT

FROM_HINT = ("If this machine is offline, copy from a local mirror instead: "
             "python -m minihbt.download NAME --from DIR (see --help).")


class DownloadError(RuntimeError):
    """A download or copy failed; the message says what, where, and what to do."""

    def __init__(self, message, url=None, status=None):
        super().__init__(message)
        self.url, self.status = url, status


def _say(msg, progress):
    if progress:
        tqdm.write(msg, file=sys.stderr)


def _present(dest, sha256, force, progress):
    """True when dest is already there and (where a checksum is known) correct."""
    if force or not os.path.exists(dest):
        return False
    if sha256 is None:
        _say(f"{dest}: present, skipped (--force downloads it again)", progress)
        return True
    actual = sha256_file(dest)
    if actual == sha256.lower():
        _say(f"{dest}: present, checksum ok", progress)
        return True
    _say(f"{dest}: present but sha256 {actual} != {sha256}; fetching it again", progress)
    os.remove(dest)
    return False


def _commit(part, dest, sha256, actual, source):
    """Rename part to dest if its checksum is right; otherwise delete it and raise."""
    if sha256 is not None and actual != sha256.lower():
        Path(part).unlink(missing_ok=True)
        raise DownloadError(
            f"checksum mismatch for {os.path.basename(dest)}\n"
            f"  source:   {source}\n  expected sha256: {sha256}\n  actual sha256:   {actual}\n"
            f"The file was deleted, nothing was saved. The source is damaged or not the pinned "
            f"version.", url=source)
    os.replace(part, dest)


def _http_message(url, code, reason):
    hint = {404: "no such file or repository", 401: "unauthorized: the repository may not exist, or be private or gated",
            403: "forbidden", 429: "rate limited: wait and retry"}.get(code, "")
    return f"HTTP {code} {reason} for {url}" + (f" ({hint})" if hint else "") + f".\n{FROM_HINT}"


def _open(url, offset, timeout):
    headers = {"User-Agent": USER_AGENT}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    opener = urllib.request.build_opener()     # built per call: proxy settings follow the environment
    try:
        return opener.open(urllib.request.Request(url, headers=headers), timeout=timeout)
    except HTTPError as e:
        e.close()
        raise DownloadError(_http_message(url, e.code, e.reason), url=url, status=e.code) from None
    except (URLError, OSError, http.client.HTTPException) as e:   # refused, DNS, timeout, reset
        reason = getattr(e, "reason", None) or e
        raise DownloadError(f"cannot download {url}: {reason}.\n{FROM_HINT}", url=url) from None


def _range_start(resp):
    m = re.match(r"bytes\s+(\d+)-", resp.headers.get("Content-Range", ""))
    return int(m.group(1)) if m else None


def fetch(url, dest, sha256=None, progress=True, force=False, timeout=TIMEOUT):
    """Download url to dest (via dest.part, resumable), check sha256 if given; returns dest."""
    dest = os.fspath(dest)
    if _present(dest, sha256, force, progress):
        return dest
    part = dest + ".part"
    if force:
        Path(part).unlink(missing_ok=True)
    offset = os.path.getsize(part) if os.path.exists(part) else 0
    try:
        resp = _open(url, offset, timeout)
    except DownloadError as e:
        if not (offset and e.status == 416):       # 416: the .part is already as long as the file
            raise
        Path(part).unlink(missing_ok=True)
        offset, resp = 0, _open(url, 0, timeout)
    if offset and resp.status == 206 and _range_start(resp) != offset:   # not the range we asked for
        resp.close()
        offset, resp = 0, _open(url, 0, timeout)
    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)   # only once the server answered
    h = hashlib.sha256()
    if offset and resp.status == 206:
        _say(f"{dest}: resuming at byte {offset}", progress)
        with open(part, "rb") as f:
            for block in iter(lambda: f.read(CHUNK), b""):
                h.update(block)
    else:
        offset = 0                                  # 200: the server ignored the range; start over
    length = resp.headers.get("Content-Length")
    total = offset + int(length) if length and length.isdigit() else None
    got, failure = offset, None
    bar = progress_bar(total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
                       desc=os.path.basename(dest), disable=not progress, file=sys.stderr, leave=False)
    with resp, bar, open(part, "ab" if offset else "wb") as f:
        while True:
            try:
                block = resp.read(CHUNK)
            except (OSError, http.client.HTTPException) as e:   # reset, timeout, truncated chunk
                failure = e
                break
            if not block:
                break
            f.write(block)
            h.update(block)
            got += len(block)
            bar.update(len(block))
    if failure is not None or (total is not None and got < total):
        why = f" ({failure})" if failure is not None else ""
        raise DownloadError(
            f"transfer of {url} interrupted after {got} of {total if total else '?'} bytes{why}.\n"
            f"The partial file {part} is kept: run the same command again to resume it.\n{FROM_HINT}",
            url=url)
    _commit(part, dest, sha256, h.hexdigest(), url)
    _say(f"{dest}: downloaded" + (", checksum ok" if sha256 else ""), progress)
    return dest


def copy_file(src, dest, sha256=None, progress=True, force=False):
    """Copy a local file to dest via dest.part, checked like fetch. A copy, never a link: an edit of
    the working copy must not change the mirror, nor a damaged mirror file change the copy."""
    src, dest = os.fspath(src), os.fspath(dest)
    if not os.path.isfile(src):
        raise DownloadError(f"{src} not found in the local mirror.")
    if _present(dest, sha256, force, progress):
        return dest
    part = dest + ".part"
    Path(part).unlink(missing_ok=True)
    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    shutil.copyfile(src, part)
    _commit(part, dest, sha256, sha256_file(part) if sha256 else None, src)
    _say(f"{dest}: copied from {src}" + (", checksum ok" if sha256 else ""), progress)
    return dest
