/* The power-cut harness's LD_PRELOAD shim.
 *
 * Every change a process makes under $POWERCUT_ROOT through libc is recorded,
 * before it is made, in an undo log under $POWERCUT_STATE (outside the root):
 * a file's overwritten bytes and previous length until the next fsync or
 * fdatasync of that file returns; a creation, removal or rename until the next
 * fsync of its directory returns. After SIGKILL, `powercut-restore` rolls the
 * tree back to what a power cut would leave. With POWERCUT_NOSYNC=1 fsync and
 * fdatasync under the root do nothing (so nothing is ever durable), to show a
 * test that relies on them fails. README.md states what is and is not modelled.
 *
 * Build: cc -O2 -shared -fPIC -o libpowercut.so powercut.c -ldl -lpthread */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

#include "powercut.h"

#define MAXFD 65536
#define COMMA ,

struct file {
    dev_t dev;
    ino_t ino;
    int ufd;      /* the undo log, open while refs > 0 */
    int rfd;      /* the file, open for reading (its fds may be write-only) */
    int refs;     /* tracked fds on this inode */
    uint64_t len; /* bytes in the undo log */
};

struct fdinfo {
    int file; /* index in files + 1; 0: not tracked */
    int is_dir;
    int append;
    dev_t dev;
    ino_t ino;
};

/* A metadata event not yet durable that holds a shadow copy to free once it is. */
struct pending {
    uint64_t seq;
    dev_t dev;
    ino_t ino;
    char shadow[32];
};

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static int active;
static int nosync;
static char root[PATH_MAX];
static size_t root_len;
static char state[PATH_MAX];
static int meta_fd = -1;
static uint64_t seq;
static struct fdinfo fds[MAXFD];
static struct file *files; /* every inode tracked in this life */
static int nfiles, cap_files;
static struct pending *pend; /* unsynced name changes holding a shadow copy */
static int npend, cap_pend;

static int (*real_openat)(int, const char *, int, ...);
static ssize_t (*real_write)(int, const void *, size_t);
static ssize_t (*real_pwrite)(int, const void *, size_t, off_t);
static ssize_t (*real_writev)(int, const struct iovec *, int);
static ssize_t (*real_pwritev)(int, const struct iovec *, int, off_t);
static ssize_t (*real_pwritev2)(int, const struct iovec *, int, off_t, int);
static int (*real_ftruncate)(int, off_t);
static int (*real_fallocate)(int, int, off_t, off_t);
static int (*real_posix_fallocate)(int, off_t, off_t);
static int (*real_fsync)(int);
static int (*real_fdatasync)(int);
static void (*real_sync)(void);
static int (*real_syncfs)(int);
static int (*real_close)(int);
static int (*real_dup)(int);
static int (*real_dup2)(int, int);
static int (*real_dup3)(int, int, int);
static int (*real_fcntl)(int, int, ...);
static int (*real_mkdirat)(int, const char *, mode_t);
static int (*real_unlinkat)(int, const char *, int);
static int (*real_renameat2)(int, const char *, int, const char *, unsigned int);

#define REAL(name, sym) name = dlsym(RTLD_NEXT, sym)

__attribute__((constructor)) static void pc_init(void) {
    REAL(real_openat, "openat");
    REAL(real_write, "write");
    REAL(real_pwrite, "pwrite64");
    REAL(real_writev, "writev");
    REAL(real_pwritev, "pwritev64");
    REAL(real_pwritev2, "pwritev64v2");
    REAL(real_ftruncate, "ftruncate64");
    REAL(real_fallocate, "fallocate64");
    REAL(real_posix_fallocate, "posix_fallocate64");
    REAL(real_fsync, "fsync");
    REAL(real_fdatasync, "fdatasync");
    REAL(real_sync, "sync");
    REAL(real_syncfs, "syncfs");
    REAL(real_close, "close");
    REAL(real_dup, "dup");
    REAL(real_dup2, "dup2");
    REAL(real_dup3, "dup3");
    REAL(real_fcntl, "fcntl");
    REAL(real_mkdirat, "mkdirat");
    REAL(real_unlinkat, "unlinkat");
    REAL(real_renameat2, "renameat2");
    const char *r = getenv(PC_ENV_ROOT), *s = getenv(PC_ENV_STATE), *n = getenv(PC_ENV_NOSYNC);
    if (!r || !s || !*r || !*s)
        return;
    nosync = n && strcmp(n, "1") == 0;
    /* The root may not exist yet: resolve its parent, then append its name. */
    char tmp[PATH_MAX];
    snprintf(tmp, sizeof tmp, "%s", r);
    size_t l = strlen(tmp);
    while (l > 1 && tmp[l - 1] == '/')
        tmp[--l] = 0;
    char *slash = strrchr(tmp, '/');
    if (!slash)
        return;
    *slash = 0;
    char parent[PATH_MAX];
    if (!realpath(*tmp ? tmp : "/", parent))
        return;
    snprintf(root, sizeof root, "%s/%s", strcmp(parent, "/") ? parent : "", slash + 1);
    root_len = strlen(root);
    snprintf(state, sizeof state, "%s", s);
    char p[PATH_MAX];
    real_mkdirat(AT_FDCWD, state, 0755);
    snprintf(p, sizeof p, "%s/" PC_DATA_DIR, state);
    real_mkdirat(AT_FDCWD, p, 0755);
    snprintf(p, sizeof p, "%s/" PC_SHADOW_DIR, state);
    real_mkdirat(AT_FDCWD, p, 0755);
    snprintf(p, sizeof p, "%s/" PC_META, state);
    /* Go on numbering after the events of an earlier life of this state. */
    FILE *f = fopen(p, "r");
    if (f) {
        unsigned long long v;
        char line[3 * PATH_MAX];
        while (fgets(line, sizeof line, f))
            if (sscanf(line, "%llu", &v) == 1 && v >= seq)
                seq = v + 1;
        fclose(f);
    }
    meta_fd = real_openat(AT_FDCWD, p, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    if (meta_fd < 0)
        return;
    active = 1;
}

/* Writes all of buf (the undo logs are ours: never a short write left behind). */
static int write_all(int fd, const void *buf, size_t n) {
    const char *b = buf;
    while (n > 0) {
        ssize_t w = real_write(fd, b, n);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            return -1;
        b += w;
        n -= (size_t)w;
    }
    return 0;
}

static void meta(const char *fmt, ...) {
    char line[3 * PATH_MAX + 64];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    if (n > 0 && (size_t)n < sizeof line) {
        int e = errno;
        write_all(meta_fd, line, (size_t)n);
        errno = e;
    }
}

/* The absolute path of `path` relative to `dirfd`, its parent resolved: 2 if
 * it is under the root, 1 if it is the root (whose own name is not modelled). */
static int resolve(int dirfd, const char *path, char *out) {
    if (!active || !path)
        return 0;
    char full[PATH_MAX], base[PATH_MAX];
    if (path[0] == '/') {
        snprintf(full, sizeof full, "%s", path);
    } else {
        if (dirfd == AT_FDCWD) {
            if (!getcwd(base, sizeof base))
                return 0;
        } else {
            char link[64];
            snprintf(link, sizeof link, "/proc/self/fd/%d", dirfd);
            ssize_t n = readlink(link, base, sizeof base - 1);
            if (n <= 0)
                return 0;
            base[n] = 0;
        }
        if (snprintf(full, sizeof full, "%s/%s", base, path) >= (int)sizeof full)
            return 0;
    }
    size_t l = strlen(full);
    while (l > 1 && full[l - 1] == '/')
        full[--l] = 0;
    char *slash = strrchr(full, '/');
    const char *name = slash + 1;
    char parent[PATH_MAX];
    if (strcmp(name, ".") == 0 || strcmp(name, "..") == 0) {
        if (!realpath(full, out))
            return 0;
    } else {
        *slash = 0;
        if (!realpath(*full ? full : "/", parent))
            return 0;
        if (snprintf(out, PATH_MAX, "%s/%s", strcmp(parent, "/") ? parent : "", name) >= PATH_MAX)
            return 0;
    }
    return strncmp(out, root, root_len) != 0 ? 0 : out[root_len] == 0 ? 1 : out[root_len] == '/' ? 2 : 0;
}

/* The directory holding `path` (absolute), as dev:ino. */
static int parent_id(const char *path, dev_t *dev, ino_t *ino) {
    char p[PATH_MAX];
    snprintf(p, sizeof p, "%s", path);
    char *slash = strrchr(p, '/');
    if (!slash)
        return -1;
    *slash = 0;
    struct stat st;
    if (stat(*p ? p : "/", &st) != 0)
        return -1;
    *dev = st.st_dev;
    *ino = st.st_ino;
    return 0;
}

static int file_index(dev_t dev, ino_t ino) {
    for (int i = 0; i < nfiles; i++)
        if (files[i].dev == dev && files[i].ino == ino)
            return i;
    if (nfiles == cap_files) {
        int c = cap_files ? cap_files * 2 : 64;
        struct file *f = realloc(files, sizeof *f * (size_t)c);
        if (!f)
            return -1;
        files = f;
        cap_files = c;
    }
    struct file *f = &files[nfiles];
    f->dev = dev;
    f->ino = ino;
    f->ufd = -1;
    f->rfd = -1;
    f->refs = 0;
    f->len = 0;
    char p[PATH_MAX];
    snprintf(p, sizeof p, "%s/" PC_DATA_DIR "/%llu-%llu.undo", state, (unsigned long long)dev,
             (unsigned long long)ino);
    struct stat st;
    if (stat(p, &st) == 0)
        f->len = (uint64_t)st.st_size;
    return nfiles++;
}

/* The undo log of file i, opened if needed; -1 if it cannot be. */
static int ufd_of(int i) {
    struct file *f = &files[i];
    if (f->ufd < 0) {
        char p[PATH_MAX];
        snprintf(p, sizeof p, "%s/" PC_DATA_DIR "/%llu-%llu.undo", state, (unsigned long long)f->dev,
                 (unsigned long long)f->ino);
        f->ufd = real_openat(AT_FDCWD, p, O_RDWR | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    }
    return f->ufd;
}

static void release_ufd(int i) {
    if (files[i].refs <= 0 && files[i].ufd >= 0) {
        real_close(files[i].ufd);
        files[i].ufd = -1;
    }
    if (files[i].refs <= 0 && files[i].rfd >= 0) {
        real_close(files[i].rfd);
        files[i].rfd = -1;
    }
}

static void track(int fd, struct stat *st, int flags) {
    if (fd < 0 || fd >= MAXFD)
        return;
    int i = file_index(st->st_dev, st->st_ino);
    if (i < 0)
        return;
    files[i].refs++;
    fds[fd].file = i + 1;
    fds[fd].is_dir = S_ISDIR(st->st_mode);
    fds[fd].append = (flags & O_APPEND) != 0;
    fds[fd].dev = st->st_dev;
    fds[fd].ino = st->st_ino;
}

static void untrack(int fd) {
    if (fd < 0 || fd >= MAXFD || !fds[fd].file)
        return;
    int i = fds[fd].file - 1;
    files[i].refs--;
    release_ufd(i);
    fds[fd].file = 0;
}

static int tracked(int fd) { return active && fd >= 0 && fd < MAXFD && fds[fd].file; }
static int tracked_file(int fd) { return tracked(fd) && !fds[fd].is_dir; }

/* Records the bytes of file i (open as fd) at [off, off + n) and its size,
 * before they change. Called with the lock held. */
static void record_i(int i, int fd, uint64_t off, uint64_t n) {
    struct stat st;
    if (fstat(fd, &st) != 0)
        return;
    int u = ufd_of(i);
    if (u < 0)
        return;
    uint64_t size = (uint64_t)st.st_size;
    uint64_t have = off < size ? (size - off < n ? size - off : n) : 0;
    if (have > 0 && files[i].rfd < 0) {
        char link[64];
        snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
        files[i].rfd = real_openat(AT_FDCWD, link, O_RDONLY | O_CLOEXEC, 0);
    }
    struct pc_undo h = {off, size, have};
    if (write_all(u, &h, sizeof h) != 0)
        return;
    char buf[65536];
    uint64_t done = 0;
    while (done < have) {
        size_t chunk = have - done < sizeof buf ? (size_t)(have - done) : sizeof buf;
        ssize_t r = pread(files[i].rfd, buf, chunk, (off_t)(off + done));
        if (r <= 0) {
            memset(buf, 0, chunk); /* cannot happen on a regular file; keep the record whole */
            r = (ssize_t)chunk;
        }
        write_all(u, buf, (size_t)r);
        done += (uint64_t)r;
    }
    files[i].len += sizeof h + have;
    release_ufd(i);
}

static void record(int fd, int64_t off, uint64_t n) {
    if (off < 0) {
        struct stat st;
        off = fds[fd].append && fstat(fd, &st) == 0 ? st.st_size : lseek(fd, 0, SEEK_CUR);
        if (off < 0)
            return;
    }
    record_i(fds[fd].file - 1, fd, (uint64_t)off, n);
}

/* File i's log up to `upto` bytes is durable now: drop it, keep what came after. */
static void trim(int i, uint64_t upto) {
    struct file *f = &files[i];
    if (upto == 0)
        return;
    int u = ufd_of(i);
    if (u < 0)
        return;
    if (f->len <= upto) {
        real_ftruncate(u, 0);
        f->len = 0;
    } else {
        uint64_t tail = f->len - upto;
        char *buf = malloc(tail);
        if (buf && pread(u, buf, tail, (off_t)upto) == (ssize_t)tail) {
            real_ftruncate(u, 0);
            write_all(u, buf, tail);
            f->len = tail;
        }
        free(buf);
    }
    release_ufd(i);
}

static void drop_shadow(const char *name) {
    char p[PATH_MAX];
    snprintf(p, sizeof p, "%s/" PC_SHADOW_DIR "/%s", state, name);
    real_unlinkat(AT_FDCWD, p, 0);
}

static void pending_add(uint64_t s, const char *path, const char *shadow) {
    dev_t d;
    ino_t n;
    if (parent_id(path, &d, &n) != 0)
        return;
    if (npend == cap_pend) {
        int c = cap_pend ? cap_pend * 2 : 64;
        struct pending *p = realloc(pend, sizeof *p * (size_t)c);
        if (!p)
            return;
        pend = p;
        cap_pend = c;
    }
    pend[npend].seq = s;
    pend[npend].dev = d;
    pend[npend].ino = n;
    snprintf(pend[npend].shadow, sizeof pend[npend].shadow, "%s", shadow);
    npend++;
}

/* Events before `s` in directory dev:ino (all: every directory) are durable:
 * their shadow copies are not needed any more. */
static void pending_durable(uint64_t s, int all, dev_t dev, ino_t ino) {
    int k = 0;
    for (int j = 0; j < npend; j++) {
        if (pend[j].seq < s && (all || (pend[j].dev == dev && pend[j].ino == ino)))
            drop_shadow(pend[j].shadow);
        else
            pend[k++] = pend[j];
    }
    npend = k;
}

/* Keeps the file at `path` (if a regular file) as shadow copy `name`. */
static int shadow_of(const char *path, char *name, size_t size) {
    struct stat st;
    if (lstat(path, &st) != 0 || !S_ISREG(st.st_mode))
        return 0;
    snprintf(name, size, "%llu", (unsigned long long)seq);
    char p[PATH_MAX];
    snprintf(p, sizeof p, "%s/" PC_SHADOW_DIR "/%s", state, name);
    return link(path, p) == 0;
}

/* ---- opening ---- */

static int do_openat(int dirfd, const char *path, int flags, mode_t mode) {
    char abs[PATH_MAX];
    if (!resolve(dirfd, path, abs))
        return real_openat(dirfd, path, flags, mode);
    pthread_mutex_lock(&lock);
    struct stat before;
    int existed = fstatat(dirfd, path, &before, 0) == 0;
    if (existed && (flags & O_TRUNC) && S_ISREG(before.st_mode) && before.st_size > 0 &&
        (flags & O_ACCMODE) != O_RDONLY) {
        /* The truncation at open: keep the whole content. */
        int r = real_openat(dirfd, path, O_RDONLY | O_CLOEXEC, 0);
        if (r >= 0) {
            int i = file_index(before.st_dev, before.st_ino);
            if (i >= 0)
                record_i(i, r, 0, (uint64_t)before.st_size);
            real_close(r);
        }
    }
    int fd = real_openat(dirfd, path, flags, mode);
    int e = errno;
    struct stat st;
    if (fd >= 0 && fstat(fd, &st) == 0) {
        if (!existed && (flags & O_CREAT)) {
            int i = file_index(st.st_dev, st.st_ino);
            if (i >= 0 && files[i].len > 0) { /* a reused inode: its old log is void */
                if (ufd_of(i) >= 0)
                    real_ftruncate(files[i].ufd, 0);
                files[i].len = 0;
                release_ufd(i);
            }
            dev_t d;
            ino_t n;
            if (parent_id(abs, &d, &n) == 0)
                meta("%llu\tCREATE\t%llu:%llu\t%s\n", (unsigned long long)seq++, (unsigned long long)d,
                     (unsigned long long)n, abs);
        }
        track(fd, &st, flags);
    }
    pthread_mutex_unlock(&lock);
    errno = e;
    return fd;
}

static mode_t mode_arg(int flags, va_list ap) {
    return ((flags & O_CREAT) || (flags & O_TMPFILE) == O_TMPFILE) ? (mode_t)va_arg(ap, int) : 0;
}

#define OPEN_AT(name, dirfd_param, dirfd)                                                                       \
    int name(dirfd_param const char *path, int flags, ...) {                                                   \
        va_list ap;                                                                                            \
        va_start(ap, flags);                                                                                   \
        mode_t m = mode_arg(flags, ap);                                                                        \
        va_end(ap);                                                                                            \
        return do_openat(dirfd, path, flags, m);                                                               \
    }
OPEN_AT(open, , AT_FDCWD)
OPEN_AT(open64, , AT_FDCWD)
OPEN_AT(openat, int dirfd_arg COMMA, dirfd_arg)
OPEN_AT(openat64, int dirfd_arg COMMA, dirfd_arg)
int creat(const char *path, mode_t mode) { return do_openat(AT_FDCWD, path, O_CREAT | O_WRONLY | O_TRUNC, mode); }
int creat64(const char *path, mode_t mode) { return do_openat(AT_FDCWD, path, O_CREAT | O_WRONLY | O_TRUNC, mode); }

int close(int fd) {
    if (tracked(fd)) {
        pthread_mutex_lock(&lock);
        untrack(fd);
        pthread_mutex_unlock(&lock);
    }
    return real_close(fd);
}

static void copy_fd(int from, int to) {
    if (to < 0 || to >= MAXFD || from == to)
        return;
    untrack(to);
    if (!tracked(from))
        return;
    fds[to] = fds[from];
    files[fds[from].file - 1].refs++;
}

/* The new fd `r` of a dup-like call is tracked like `fd`. */
#define DUP(call)                                                                                              \
    do {                                                                                                       \
        pthread_mutex_lock(&lock);                                                                             \
        int r = (call);                                                                                        \
        int e = errno;                                                                                         \
        if (r >= 0)                                                                                            \
            copy_fd(fd, r);                                                                                    \
        pthread_mutex_unlock(&lock);                                                                           \
        errno = e;                                                                                             \
        return r;                                                                                              \
    } while (0)

int dup(int fd) { DUP(real_dup(fd)); }
int dup2(int fd, int to) { DUP(real_dup2(fd, to)); }
int dup3(int fd, int to, int flags) { DUP(real_dup3(fd, to, flags)); }
static int do_fcntl(int fd, int cmd, long arg) {
    if (cmd != F_DUPFD && cmd != F_DUPFD_CLOEXEC)
        return real_fcntl(fd, cmd, arg);
    DUP(real_fcntl(fd, cmd, arg));
}
#define FCNTL(name)                                                                                            \
    int name(int fd, int cmd, ...) {                                                                           \
        va_list ap;                                                                                            \
        va_start(ap, cmd);                                                                                     \
        long arg = va_arg(ap, long);                                                                           \
        va_end(ap);                                                                                            \
        return do_fcntl(fd, cmd, arg);                                                                         \
    }
FCNTL(fcntl)
FCNTL(fcntl64)

/* ---- writing ---- */
static size_t iov_len(const struct iovec *iov, int n) {
    size_t t = 0;
    for (int i = 0; i < n; i++)
        t += iov[i].iov_len;
    return t;
}

ssize_t write(int fd, const void *buf, size_t n) {
    if (!tracked_file(fd))
        return real_write(fd, buf, n);
    pthread_mutex_lock(&lock);
    record(fd, -1, n);
    ssize_t r = real_write(fd, buf, n);
    int e = errno;
    pthread_mutex_unlock(&lock);
    errno = e;
    return r;
}

#define WRITE_AT(call, off, n)                                                                                 \
    do {                                                                                                       \
        pthread_mutex_lock(&lock);                                                                             \
        record(fd, (off), (n));                                                                                \
        ssize_t r = (call);                                                                                    \
        int e = errno;                                                                                         \
        pthread_mutex_unlock(&lock);                                                                           \
        errno = e;                                                                                             \
        return r;                                                                                              \
    } while (0)

ssize_t pwrite(int fd, const void *buf, size_t n, off_t off) {
    if (!tracked_file(fd))
        return real_pwrite(fd, buf, n, off);
    WRITE_AT(real_pwrite(fd, buf, n, off), off, n);
}
ssize_t pwrite64(int fd, const void *buf, size_t n, off_t off) { return pwrite(fd, buf, n, off); }ssize_t writev(int fd, const struct iovec *iov, int cnt) {
    if (!tracked_file(fd))
        return real_writev(fd, iov, cnt);
    WRITE_AT(real_writev(fd, iov, cnt), -1, iov_len(iov, cnt));
}
ssize_t pwritev(int fd, const struct iovec *iov, int cnt, off_t off) {
    if (!tracked_file(fd))
        return real_pwritev(fd, iov, cnt, off);
    WRITE_AT(real_pwritev(fd, iov, cnt, off), off, iov_len(iov, cnt));
}
ssize_t pwritev64(int fd, const struct iovec *iov, int cnt, off_t off) { return pwritev(fd, iov, cnt, off); }
ssize_t pwritev2(int fd, const struct iovec *iov, int cnt, off_t off, int flags) {
    if (!tracked_file(fd))
        return real_pwritev2(fd, iov, cnt, off, flags);
    WRITE_AT(real_pwritev2(fd, iov, cnt, off, flags), off, iov_len(iov, cnt));
}
ssize_t pwritev64v2(int fd, const struct iovec *iov, int cnt, off_t off, int flags) {
    return pwritev2(fd, iov, cnt, off, flags);
}

int ftruncate(int fd, off_t len) {
    if (!tracked_file(fd) || len < 0)
        return real_ftruncate(fd, len);
    pthread_mutex_lock(&lock);
    struct stat st;
    if (fstat(fd, &st) == 0)
        record(fd, len, st.st_size > len ? (uint64_t)(st.st_size - len) : 0);
    int r = real_ftruncate(fd, len);
    int e = errno;
    pthread_mutex_unlock(&lock);
    errno = e;
    return r;
}
int ftruncate64(int fd, off_t len) { return ftruncate(fd, len); }

int fallocate(int fd, int mode, off_t off, off_t len) {
    if (!tracked_file(fd) || off < 0 || len < 0)
        return real_fallocate(fd, mode, off, len);
    WRITE_AT(real_fallocate(fd, mode, off, len), off, (uint64_t)len);
}
int fallocate64(int fd, int mode, off_t off, off_t len) { return fallocate(fd, mode, off, len); }
int posix_fallocate(int fd, off_t off, off_t len) {
    if (!tracked_file(fd) || off < 0 || len < 0)
        return real_posix_fallocate(fd, off, len);
    WRITE_AT(real_posix_fallocate(fd, off, len), off, 0);
}
int posix_fallocate64(int fd, off_t off, off_t len) { return posix_fallocate(fd, off, len); }

/* ---- syncing ---- */
static int do_sync(int fd, int (*real)(int)) {
    if (!tracked(fd))
        return real(fd);
    if (nosync)
        return 0;
    pthread_mutex_lock(&lock);
    int i = fds[fd].file - 1, dir = fds[fd].is_dir;
    dev_t dev = fds[fd].dev;
    ino_t ino = fds[fd].ino;
    uint64_t upto = files[i].len;
    uint64_t s = seq++;
    files[i].refs++; /* keep the entry's log open across the sync */
    pthread_mutex_unlock(&lock);
    int r = real(fd);
    int e = errno;
    pthread_mutex_lock(&lock);
    files[i].refs--;
    if (r == 0) {
        if (dir) {
            meta("%llu\tSYNCDIR\t%llu:%llu\n", (unsigned long long)s, (unsigned long long)dev,
                 (unsigned long long)ino);
            pending_durable(s, 0, dev, ino);
        }
        trim(i, upto);
    }
    release_ufd(i);
    pthread_mutex_unlock(&lock);
    errno = e;
    return r;
}

int fsync(int fd) { return do_sync(fd, real_fsync); }
int fdatasync(int fd) { return do_sync(fd, real_fdatasync); }
/* sync() (fd < 0) or syncfs(fd): everything under the root is durable after it. */
static int sync_all(int fd) {
    if (!active) {
        if (fd >= 0)
            return real_syncfs(fd);
        real_sync();
        return 0;
    }
    if (nosync)
        return 0;
    pthread_mutex_lock(&lock);
    uint64_t s = seq++;
    int n = nfiles;
    uint64_t *upto = malloc(sizeof *upto * (size_t)(n ? n : 1));
    for (int i = 0; upto && i < n; i++)
        upto[i] = files[i].len;
    pthread_mutex_unlock(&lock);
    int r = 0;
    if (fd >= 0)
        r = real_syncfs(fd);
    else
        real_sync();
    pthread_mutex_lock(&lock);
    if (r == 0) {
        meta("%llu\tSYNCALL\n", (unsigned long long)s);
        pending_durable(s, 1, 0, 0);
        for (int i = 0; upto && i < n; i++)
            trim(i, upto[i]);
    }
    pthread_mutex_unlock(&lock);
    free(upto);
    return r;
}

void sync(void) { sync_all(-1); }int syncfs(int fd) {
    if (fd < 0) {
        errno = EBADF;
        return -1;
    }
    return sync_all(fd);
}

/* ---- names ---- */

int mkdirat(int dirfd, const char *path, mode_t mode) {
    char abs[PATH_MAX];
    if (resolve(dirfd, path, abs) != 2)
        return real_mkdirat(dirfd, path, mode);
    pthread_mutex_lock(&lock);
    int r = real_mkdirat(dirfd, path, mode);
    int e = errno;
    dev_t d;
    ino_t n;
    if (r == 0 && parent_id(abs, &d, &n) == 0)
        meta("%llu\tMKDIR\t%llu:%llu\t%s\n", (unsigned long long)seq++, (unsigned long long)d,
             (unsigned long long)n, abs);
    pthread_mutex_unlock(&lock);
    errno = e;
    return r;
}
int mkdir(const char *path, mode_t mode) { return mkdirat(AT_FDCWD, path, mode); }
int unlinkat(int dirfd, const char *path, int flags) {
    char abs[PATH_MAX];
    if (resolve(dirfd, path, abs) != 2)
        return real_unlinkat(dirfd, path, flags);
    pthread_mutex_lock(&lock);
    char shadow[32] = "";
    uint64_t s = seq;
    int kept = !(flags & AT_REMOVEDIR) && shadow_of(abs, shadow, sizeof shadow);
    int r = real_unlinkat(dirfd, path, flags);
    int e = errno;
    dev_t d;
    ino_t n;
    if (r == 0 && parent_id(abs, &d, &n) == 0) {
        seq++;
        if (flags & AT_REMOVEDIR) {
            meta("%llu\tRMDIR\t%llu:%llu\t%s\n", (unsigned long long)s, (unsigned long long)d,
                 (unsigned long long)n, abs);
        } else {
            meta("%llu\tUNLINK\t%llu:%llu\t%s\t%s\n", (unsigned long long)s, (unsigned long long)d,
                 (unsigned long long)n, abs, kept ? shadow : "-");
            if (kept)
                pending_add(s, abs, shadow);
        }
    } else if (kept) {
        drop_shadow(shadow);
    }
    pthread_mutex_unlock(&lock);
    errno = e;
    return r;
}
int unlink(const char *path) { return unlinkat(AT_FDCWD, path, 0); }
int rmdir(const char *path) { return unlinkat(AT_FDCWD, path, AT_REMOVEDIR); }
int renameat2(int olddir, const char *from, int newdir, const char *to, unsigned int flags) {
    char a[PATH_MAX], b[PATH_MAX];
    int in_a = resolve(olddir, from, a) == 2, in_b = resolve(newdir, to, b) == 2;
    if (!in_a && !in_b)
        return real_renameat2(olddir, from, newdir, to, flags);
    pthread_mutex_lock(&lock);
    char shadow[32] = "";
    uint64_t s = seq;
    int kept = in_b && shadow_of(b, shadow, sizeof shadow);
    int r = real_renameat2(olddir, from, newdir, to, flags);
    int e = errno;
    dev_t d;
    ino_t n;
    if (r == 0 && in_b && parent_id(b, &d, &n) == 0) {
        seq++;
        meta("%llu\tRENAME\t%llu:%llu\t%s\t%s\t%s\n", (unsigned long long)s, (unsigned long long)d,
             (unsigned long long)n, in_a ? a : "-", b, kept ? shadow : "-");
        if (kept)
            pending_add(s, b, shadow);
    } else if (kept) {
        drop_shadow(shadow);
    }
    pthread_mutex_unlock(&lock);
    errno = e;
    return r;
}
int renameat(int olddir, const char *from, int newdir, const char *to) {
    return renameat2(olddir, from, newdir, to, 0);
}
int rename(const char *from, const char *to) { return renameat2(AT_FDCWD, from, AT_FDCWD, to, 0); }
