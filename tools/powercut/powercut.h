/* The power-cut harness: what the LD_PRELOAD shim (powercut.c) records and the
 * restore tool (restore.c) reads back. See README.md for the model. */
#ifndef POWERCUT_H
#define POWERCUT_H

#include <stdint.h>

/* Environment of the process under test. */
#define PC_ENV_ROOT "POWERCUT_ROOT"     /* the directory tree that loses power */
#define PC_ENV_STATE "POWERCUT_STATE"   /* where the undo logs live (outside the root) */
#define PC_ENV_NOSYNC "POWERCUT_NOSYNC" /* "1": fsync/fdatasync do nothing (proves a test can fail) */

/* One undo record of a file's data, in <state>/data/<dev>-<ino>.undo, binary,
 * host byte order, followed by `len` bytes: the file's bytes at
 * [offset, offset + len) before the change. Undone newest first: truncate the
 * file to `old_size`, then put the bytes back. A file's log is emptied when an
 * fsync or fdatasync of the file returns. */
struct pc_undo {
    uint64_t offset;
    uint64_t old_size;
    uint64_t len;
};

/* The metadata log, <state>/meta.log, one line per event, tab-separated:
 *   <seq> CREATE <dirdev>:<dirino> <path>                 a file created by open(O_CREAT)
 *   <seq> MKDIR  <dirdev>:<dirino> <path>
 *   <seq> UNLINK <dirdev>:<dirino> <path> <shadow>        the file is kept as <state>/shadow/<shadow>
 *   <seq> RMDIR  <dirdev>:<dirino> <path>
 *   <seq> RENAME <dirdev>:<dirino> <from> <to> <shadow|->  <shadow>: the file <to> replaced
 *   <seq> SYNCDIR <dirdev>:<dirino>                       an fsync of that directory returned
 *   <seq> SYNCALL                                         sync() or syncfs() returned
 * An event is durable if a SYNCDIR of its directory (RENAME: of the target's
 * directory) or a SYNCALL with a higher <seq> follows it. <seq> of a SYNC is
 * taken when the sync starts, so events racing with it stay undurable. */
#define PC_META "meta.log"
#define PC_DATA_DIR "data"
#define PC_SHADOW_DIR "shadow"

#endif
