/* LD_PRELOAD shim for fault-injection tests: makes fsync/fdatasync/write fail or stall on files whose
 * path contains $FAULT_MATCH, as told by the control file $FAULT_CTL (re-read on every call, so a test
 * switches faults on and off while the process runs). Control file contents:
 *   fsync-eio       fsync and fdatasync fail with EIO
 *   write-eio       write and pwrite fail with EIO
 *   write-enospc    write and pwrite fail with ENOSPC (a full disk)
 *   slow-fsync N    fsync and fdatasync take N more milliseconds
 * A missing or empty control file means no fault. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

static char mode[64];

static int matches(int fd) {
    const char *want = getenv("FAULT_MATCH");
    char link[64], path[4096];
    ssize_t n;
    if (!want || !*want) return 0;
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    n = readlink(link, path, sizeof path - 1);
    if (n <= 0) return 0;
    path[n] = 0;
    return strstr(path, want) != NULL;
}

static const char *current(void) {
    const char *ctl = getenv("FAULT_CTL");
    int fd, saved = errno;
    ssize_t n;
    mode[0] = 0;
    if (ctl && (fd = open(ctl, O_RDONLY | O_CLOEXEC)) >= 0) {
        n = read(fd, mode, sizeof mode - 1);
        mode[n > 0 ? n : 0] = 0;
        close(fd);
    }
    errno = saved;
    return mode;
}

static int sync_fault(int fd) {
    const char *m;
    if (!matches(fd)) return 0;
    m = current();
    if (strncmp(m, "fsync-eio", 9) == 0) { errno = EIO; return -1; }
    if (strncmp(m, "slow-fsync", 10) == 0) {
        long ms = atol(m + 10);
        struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
        nanosleep(&ts, NULL);
    }
    return 0;
}

static int write_fault(int fd) {
    const char *m;
    if (fd <= 2 || !matches(fd)) return 0;
    m = current();
    if (strncmp(m, "write-eio", 9) == 0) { errno = EIO; return -1; }
    if (strncmp(m, "write-enospc", 12) == 0) { errno = ENOSPC; return -1; }
    return 0;
}

int fsync(int fd) {
    static int (*real)(int);
    if (!real) real = dlsym(RTLD_NEXT, "fsync");
    return sync_fault(fd) ? -1 : real(fd);
}

int fdatasync(int fd) {
    static int (*real)(int);
    if (!real) real = dlsym(RTLD_NEXT, "fdatasync");
    return sync_fault(fd) ? -1 : real(fd);
}

ssize_t write(int fd, const void *buf, size_t n) {
    static ssize_t (*real)(int, const void *, size_t);
    if (!real) real = dlsym(RTLD_NEXT, "write");
    return write_fault(fd) ? -1 : real(fd, buf, n);
}

ssize_t pwrite(int fd, const void *buf, size_t n, off_t off) {
    static ssize_t (*real)(int, const void *, size_t, off_t);
    if (!real) real = dlsym(RTLD_NEXT, "pwrite");
    return write_fault(fd) ? -1 : real(fd, buf, n, off);
}

ssize_t pwrite64(int fd, const void *buf, size_t n, off_t off) {
    static ssize_t (*real)(int, const void *, size_t, off_t);
    if (!real) real = dlsym(RTLD_NEXT, "pwrite64");
    return write_fault(fd) ? -1 : real(fd, buf, n, off);
}
