/* powercut-restore <root> <state>: after the process that ran with the shim
 * (powercut.c) is dead, rolls <root> back to what a power cut would have left:
 * every file's data to its last fsync/fdatasync, every creation, removal and
 * rename not made durable by an fsync of its directory undone. Then empties
 * <state>, so the next life starts with everything on disk durable.
 * Prints one line: what it undid.
 *
 * Build: cc -O2 -o powercut-restore restore.c */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <limits.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "powercut.h"

struct inode {
    dev_t dev;
    ino_t ino;
    char *path;
};

static struct inode *inodes;
static size_t ninodes, cap_inodes;

static int add_inode(const char *path, const struct stat *st, int type, struct FTW *ftw) {
    (void)ftw;
    if (type != FTW_F || !S_ISREG(st->st_mode))
        return 0;
    if (ninodes == cap_inodes) {
        cap_inodes = cap_inodes ? cap_inodes * 2 : 256;
        inodes = realloc(inodes, sizeof *inodes * cap_inodes);
        if (!inodes) {
            perror("powercut-restore");
            exit(2);
        }
    }
    inodes[ninodes].dev = st->st_dev;
    inodes[ninodes].ino = st->st_ino;
    inodes[ninodes].path = strdup(path);
    ninodes++;
    return 0;
}

static const char *path_of(dev_t dev, ino_t ino) {
    for (size_t i = 0; i < ninodes; i++)
        if (inodes[i].dev == dev && inodes[i].ino == ino)
            return inodes[i].path;
    return NULL;
}

static int rm_entry(const char *path, const struct stat *st, int type, struct FTW *ftw) {
    (void)st;
    (void)type;
    (void)ftw;
    return remove(path) == 0 || errno == ENOENT ? 0 : -1;
}

static void rm_rf(const char *path) { nftw(path, rm_entry, 16, FTW_DEPTH | FTW_PHYS); }

/* Undoes one file's log, newest record first. Returns the bytes put back. */
static long long undo_file(const char *log, const char *target) {
    FILE *f = fopen(log, "rb");
    if (!f)
        return 0;
    size_t n = 0, cap = 0;
    long *at = NULL;
    struct pc_undo h;
    for (;;) {
        long pos = ftell(f);
        if (fread(&h, sizeof h, 1, f) != 1)
            break;
        if (fseek(f, (long)h.len, SEEK_CUR) != 0)
            break;
        if (n == cap) {
            cap = cap ? cap * 2 : 64;
            at = realloc(at, sizeof *at * cap);
            if (!at)
                exit(2);
        }
        at[n++] = pos;
    }
    int fd = open(target, O_WRONLY);
    long long bytes = 0;
    char *buf = NULL;
    for (size_t k = n; fd >= 0 && k-- > 0;) {
        if (fseek(f, at[k], SEEK_SET) != 0 || fread(&h, sizeof h, 1, f) != 1)
            break;
        buf = realloc(buf, h.len ? h.len : 1);
        /* A record cut short by the kill: its write never happened. */
        if (!buf || fread(buf, 1, h.len, f) != h.len)
            continue;
        if (ftruncate(fd, (off_t)h.old_size) != 0)
            perror(target);
        if (h.len && pwrite(fd, buf, h.len, (off_t)h.offset) != (ssize_t)h.len)
            perror(target);
        bytes += (long long)h.len;
    }
    free(buf);
    free(at);
    if (fd >= 0)
        close(fd);
    fclose(f);
    return bytes;
}

struct event {
    unsigned long long seq;
    char kind[16];
    char dir[64];
    char a[PATH_MAX], b[PATH_MAX], c[64];
};

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: powercut-restore <root> <state>\n");
        return 2;
    }
    const char *root = argv[1], *state = argv[2];
    char p[PATH_MAX];

    /* 1. Data: every inode with a log, wherever it is now (or as a shadow copy). */
    nftw(root, add_inode, 16, FTW_PHYS);
    snprintf(p, sizeof p, "%s/" PC_SHADOW_DIR, state);
    nftw(p, add_inode, 16, FTW_PHYS);
    snprintf(p, sizeof p, "%s/" PC_DATA_DIR, state);
    DIR *d = opendir(p);
    int files = 0;
    long long bytes = 0;
    for (struct dirent *e; d && (e = readdir(d));) {
        unsigned long long dev, ino;
        if (sscanf(e->d_name, "%llu-%llu.undo", &dev, &ino) != 2)
            continue;
        char log[PATH_MAX];
        snprintf(log, sizeof log, "%s/%s", p, e->d_name);
        struct stat st;
        const char *target = path_of((dev_t)dev, (ino_t)ino);
        if (target && stat(log, &st) == 0 && st.st_size > 0) {
            bytes += undo_file(log, target);
            files++;
        }
    }
    if (d)
        closedir(d);

    /* 2. Names: events that no later directory sync covers, newest first. */
    snprintf(p, sizeof p, "%s/" PC_META, state);
    FILE *m = fopen(p, "r");
    struct event *ev = NULL;
    size_t nev = 0, cap = 0;
    char line[3 * PATH_MAX + 128];
    while (m && fgets(line, sizeof line, m)) {
        if (!strchr(line, '\n'))
            break; /* the last line, cut by the kill: its event may not have happened */
        line[strcspn(line, "\n")] = 0;
        if (nev == cap) {
            cap = cap ? cap * 2 : 64;
            ev = realloc(ev, sizeof *ev * cap);
            if (!ev)
                return 2;
        }
        struct event *x = &ev[nev];
        memset(x, 0, sizeof *x);
        char *save = NULL, *tok = strtok_r(line, "\t", &save);
        char *fields[6] = {0};
        for (int i = 0; tok && i < 6; i++, tok = strtok_r(NULL, "\t", &save))
            fields[i] = tok;
        if (!fields[0] || !fields[1])
            continue;
        x->seq = strtoull(fields[0], NULL, 10);
        snprintf(x->kind, sizeof x->kind, "%s", fields[1]);
        snprintf(x->dir, sizeof x->dir, "%s", fields[2] ? fields[2] : "");
        snprintf(x->a, sizeof x->a, "%s", fields[3] ? fields[3] : "");
        snprintf(x->b, sizeof x->b, "%s", fields[4] ? fields[4] : "");
        snprintf(x->c, sizeof x->c, "%s", fields[5] ? fields[5] : "");
        nev++;
    }
    if (m)
        fclose(m);
    int undone = 0;
    for (size_t k = nev; k-- > 0;) {
        struct event *x = &ev[k];
        if (strncmp(x->kind, "SYNC", 4) == 0)
            continue;
        int durable = 0;
        for (size_t j = 0; j < nev && !durable; j++)
            durable = ev[j].seq > x->seq && (strcmp(ev[j].kind, "SYNCALL") == 0 ||
                                              (strcmp(ev[j].kind, "SYNCDIR") == 0 && strcmp(ev[j].dir, x->dir) == 0));
        if (durable)
            continue;
        char shadow[PATH_MAX];
        undone++;
        if (getenv("POWERCUT_VERBOSE"))
            fprintf(stderr, "powercut-restore: undo %s %s %s\n", x->kind, x->a, x->b);
        if (strcmp(x->kind, "CREATE") == 0) {
            unlink(x->a);
        } else if (strcmp(x->kind, "MKDIR") == 0) {
            rm_rf(x->a);
        } else if (strcmp(x->kind, "RMDIR") == 0) {
            mkdir(x->a, 0755);
        } else if (strcmp(x->kind, "UNLINK") == 0) {
            snprintf(shadow, sizeof shadow, "%s/" PC_SHADOW_DIR "/%s", state, x->b);
            if (strcmp(x->b, "-") != 0 && rename(shadow, x->a) != 0)
                perror(x->a);
        } else if (strcmp(x->kind, "RENAME") == 0) {
            /* a: from ("-": from outside the root), b: to, c: the file `to` replaced. */
            if (strcmp(x->a, "-") == 0)
                unlink(x->b);
            else if (rename(x->b, x->a) != 0)
                perror(x->a);
            snprintf(shadow, sizeof shadow, "%s/" PC_SHADOW_DIR "/%s", state, x->c);
            if (strcmp(x->c, "-") != 0 && rename(shadow, x->b) != 0)
                perror(x->b);
        } else {
            undone--;
        }
    }
    free(ev);

    /* 3. Everything left on disk is what survived: start the next life from it. */
    rm_rf(state);
    printf("powercut-restore: %d files rolled back (%lld bytes put back), %d name changes undone\n", files, bytes,
           undone);
    return 0;
}
