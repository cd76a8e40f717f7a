"""A FUSE passthrough that loses un-fsynced data when it dies: the "power loss" layer.

    python3 lazyfs.py BACKING_DIR MOUNTPOINT [PENDING_STATS_FILE]

Every file operation is passed through to BACKING_DIR, except that written bytes are held in
this process's memory until the file is fsync'd or fdatasync'd (or the whole FS is synced);
reads, sizes and truncates see the pending bytes. Killing this process (SIGKILL) therefore
drops exactly the data a power cut would drop from the page cache, and kill -9 of the node on
top alone never does. Metadata (create, rename, unlink, mkdir, truncate) is applied at once:
this layer models lost data, not lost directory entries.

Runs with fusepy (Debian: python3-fusepy, module `fusepy`; pip: `fusepy`, module `fuse`).
"""
import errno
import os
import sys
import threading

try:
    import fusepy as fuse
except ImportError:  # pragma: no cover
    sys.path.append("/usr/lib/python3/dist-packages")
    try:
        import fusepy as fuse
    except ImportError:
        import fuse


class Pending:
    """Unsynced writes of one file: extents (offset -> bytes) and a size override."""

    def __init__(self, size):
        self.writes = []  # (offset, bytes) in order
        self.size = size  # logical size including pending writes/truncates
        self.truncated_to = None  # smallest pending truncate

    def apply_to(self, data, off, length):
        """Overlays pending writes on `data` read from the backing file at `off`."""
        buf = bytearray(data)
        end = off + length
        if self.truncated_to is not None and len(buf) > max(0, self.truncated_to - off):
            buf = buf[:max(0, self.truncated_to - off)]
        for woff, wb in self.writes:
            wend = woff + len(wb)
            if wend <= off or woff >= end:
                continue
            s = max(off, woff)
            e = min(end, wend)
            if len(buf) < e - off:
                buf.extend(b"\0" * (e - off - len(buf)))
            buf[s - off:e - off] = wb[s - woff:e - woff]
        want = max(0, min(end, self.size) - off)
        if len(buf) < want:
            buf.extend(b"\0" * (want - len(buf)))
        return bytes(buf[:want])


class LazyFS(fuse.Operations):
    def __init__(self, root):
        self.root = os.path.realpath(root)
        self._mu = threading.RLock()
        self.pending = {}  # backing path -> Pending

    def _p(self, path):
        return os.path.join(self.root, path.lstrip("/"))

    def _flush(self, p):
        pend = self.pending.pop(p, None)
        if pend is None:
            return
        fd = os.open(p, os.O_WRONLY)
        try:
            if pend.truncated_to is not None:
                os.ftruncate(fd, pend.truncated_to)
            for off, b in pend.writes:
                os.pwrite(fd, b, off)
            if os.fstat(fd).st_size < pend.size:
                os.ftruncate(fd, pend.size)
            os.fsync(fd)
        finally:
            os.close(fd)

    # metadata
    def access(self, path, mode):
        if not os.access(self._p(path), mode):
            raise fuse.FuseOSError(errno.EACCES)

    def getattr(self, path, fh=None):
        p = self._p(path)
        st = os.lstat(p)
        d = {k: getattr(st, k) for k in ("st_atime", "st_ctime", "st_gid", "st_mode", "st_mtime",
                                         "st_nlink", "st_size", "st_uid")}
        with self._mu:
            pend = self.pending.get(p)
            if pend is not None:
                d["st_size"] = pend.size
        return d

    def readdir(self, path, fh):
        return [".", ".."] + os.listdir(self._p(path))

    def mkdir(self, path, mode):
        os.mkdir(self._p(path), mode)

    def rmdir(self, path):
        os.rmdir(self._p(path))

    def unlink(self, path):
        p = self._p(path)
        with self._mu:
            self.pending.pop(p, None)
            os.unlink(p)

    def rename(self, old, new):
        po, pn = self._p(old), self._p(new)
        with self._mu:
            os.rename(po, pn)
            pend = self.pending.pop(po, None)
            self.pending.pop(pn, None)
            if pend is not None:
                self.pending[pn] = pend

    def link(self, target, name):
        os.link(self._p(name), self._p(target))

    def symlink(self, name, target):
        os.symlink(target, self._p(name))

    def readlink(self, path):
        return os.readlink(self._p(path))

    def chmod(self, path, mode):
        os.chmod(self._p(path), mode)

    def chown(self, path, uid, gid):
        os.chown(self._p(path), uid, gid)

    def utimens(self, path, times=None):
        os.utime(self._p(path), times)

    def statfs(self, path):
        st = os.statvfs(self._p(path))
        return {k: getattr(st, k) for k in ("f_bavail", "f_bfree", "f_blocks", "f_bsize", "f_favail",
                                            "f_ffree", "f_files", "f_flag", "f_frsize", "f_namemax")}

    # data
    def open(self, path, flags):
        return os.open(self._p(path), flags & ~(os.O_APPEND | os.O_DIRECT))

    def create(self, path, mode, fi=None):
        # fusepy does not pass the caller's flags here; the kernel enforces the caller's access
        # mode on its own descriptor, so the backing one must allow both (a process may read a
        # file it created read-write: the raft log's segments are).
        return os.open(self._p(path), os.O_RDWR | os.O_CREAT | os.O_TRUNC, mode)

    def read(self, path, length, offset, fh):
        p = self._p(path)
        with self._mu:
            data = os.pread(fh, length, offset)
            pend = self.pending.get(p)
            if pend is None:
                return data
            return pend.apply_to(data, offset, length)

    def write(self, path, data, offset, fh):
        p = self._p(path)
        with self._mu:
            pend = self.pending.get(p)
            if pend is None:
                pend = self.pending[p] = Pending(os.fstat(fh).st_size)
            pend.writes.append((offset, bytes(data)))
            pend.size = max(pend.size, offset + len(data))
            if len(pend.writes) > 4096:  # keep reads cheap: coalesce by syncing early
                self._flush(p)
        return len(data)

    def truncate(self, path, length, fh=None):
        p = self._p(path)
        with self._mu:
            pend = self.pending.get(p)
            if pend is None:
                pend = self.pending[p] = Pending(os.lstat(p).st_size)
            # Drop pending bytes past the new end, remember the truncate.
            pend.writes = [(o, b[:max(0, length - o)]) for o, b in pend.writes if o < length]
            pend.truncated_to = length if pend.truncated_to is None else min(pend.truncated_to, length)
            pend.size = length

    def fallocate(self, path, mode, offset, length, fh):
        raise fuse.FuseOSError(errno.EOPNOTSUPP)

    def flush(self, path, fh):
        return 0

    def release(self, path, fh):
        os.close(fh)
        return 0

    def fsync(self, path, datasync, fh):
        p = self._p(path)
        with self._mu:
            self._flush(p)
            if os.path.isdir(p):
                fd = os.open(p, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        return 0

    def fsyncdir(self, path, datasync, fh):
        return 0

    def opendir(self, path):
        return 0

    def releasedir(self, path, fh):
        return 0


def report_pending(fs, path):
    """Writes {"files", "bytes"} of unsynced data to `path` every 0.2 s (for the nemesis)."""
    import json
    import time
    while True:
        with fs._mu:
            files = len(fs.pending)
            nbytes = sum(len(b) for p in fs.pending.values() for _, b in p.writes)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"files": files, "bytes": nbytes}, f)
        os.replace(tmp, path)
        time.sleep(0.2)


def main():
    backing, mnt = sys.argv[1], sys.argv[2]
    fs = LazyFS(backing)
    if len(sys.argv) > 3:
        threading.Thread(target=report_pending, args=(fs, sys.argv[3]), daemon=True).start()
    fuse.FUSE(fs, mnt, foreground=True, nothreads=False, allow_other=True, default_permissions=False)


if __name__ == "__main__":
    main()
