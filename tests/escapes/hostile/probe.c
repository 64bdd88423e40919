/* The hostile plugin's syscall probe: `probe NAME [ARG]` makes one raw system call by number
 * and prints what the kernel (or the seccomp filter in front of it) answered:
 *
 *     ok RET          the call succeeded (returned RET)
 *     errno=NAME      it failed with errno NAME (EPERM, ENOSYS, EINVAL, ...)
 *
 * or the process is killed by SIGSYS (the filter's answer to the i386 and x32 ABIs). The exec
 * probes copy /bin/echo somewhere and run the copy with the argument "exec-worked": if the
 * exec succeeds, that is what the probe prints instead.
 *
 * Every argument is chosen so that a call that got past the filter would either succeed or
 * fail with an errno that only the kernel's own code gives (EINVAL, EBADF, ENOTTY, EFAULT
 * ...): an EPERM, EACCES or ENOSYS then means the filter (or a missing capability) stopped it.
 * Calls that succeed undo what they did or leave the process at once; nothing here is
 * harmful when it is blocked, and only this process is touched when it is not.
 *
 * Numbers come from <sys/syscall.h>; structures the C library has no wrapper for are
 * declared here with the kernel's layout (include/uapi/linux/...).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define CLONE_NEWTIME_ 0x00000080UL
#define CLONE_NEWNS_ 0x00020000UL
#define CLONE_NEWCGROUP_ 0x02000000UL
#define CLONE_NEWUTS_ 0x04000000UL
#define CLONE_NEWIPC_ 0x08000000UL
#define CLONE_NEWUSER_ 0x10000000UL
#define CLONE_NEWPID_ 0x20000000UL
#define CLONE_NEWNET_ 0x40000000UL
#define X32_SYSCALL_BIT 0x40000000UL
#define MS_BIND_ 4096UL
#define MS_REC_ 16384UL
#define MS_REMOUNT_ 32UL
#define MNT_DETACH_ 2
#define MOUNT_ATTR_RDONLY_ 0x1UL
#define OPEN_TREE_CLONE_ 1
#define TIOCSTI_ 0x5412UL
#define TIOCLINUX_ 0x541CUL
#define READ_IMPLIES_EXEC_ 0x0400000UL
#define ADDR_NO_RANDOMIZE_ 0x0040000UL
#define PER_LINUX32_ 0x0008UL
#define KEY_SPEC_PROCESS_KEYRING_ (-2L)
#define KEY_SPEC_SESSION_KEYRING_ (-3L)
#define KEYCTL_GET_KEYRING_ID_ 0
#define BPF_MAP_CREATE_ 0
#define BPF_MAP_TYPE_ARRAY_ 2
#define PERF_TYPE_SOFTWARE_ 1
#define UFFD_USER_MODE_ONLY_ 1
#define FAN_REPORT_FID_ 0x00000200
#define KCMP_FILE_ 0
#define LINUX_REBOOT_MAGIC1_ 0xfee1deadUL
#define LINUX_REBOOT_MAGIC2_ 672274793UL
#define LINUX_REBOOT_CMD_CAD_OFF_ 0UL
#define SYSLOG_ACTION_SIZE_BUFFER_ 10
#define MPOL_DEFAULT_ 0

struct clone_args_ {  /* include/uapi/linux/sched.h, CLONE_ARGS_SIZE_VER2 */
    uint64_t flags, pidfd, child_tid, parent_tid, exit_signal, stack, stack_size, tls,
        set_tid, set_tid_size, cgroup;
};

struct mount_attr_ {  /* include/uapi/linux/mount.h */
    uint64_t attr_set, attr_clr, propagation, userns_fd;
};

struct bpf_map_create_attr_ {  /* the BPF_MAP_CREATE part of union bpf_attr */
    uint32_t map_type, key_size, value_size, max_entries, map_flags;
    char pad[128];
};

struct perf_event_attr_ {  /* include/uapi/linux/perf_event.h, PERF_ATTR_SIZE_VER0 prefix */
    uint32_t type, size;
    uint64_t config, sample_period, sample_type, read_format, flags;
    char pad[128];
};

struct io_uring_params_ {  /* include/uapi/linux/io_uring.h */
    uint32_t sq_entries, cq_entries, flags, sq_thread_cpu, sq_thread_idle, features, wq_fd;
    uint32_t resv[3];
    char sq_off[40], cq_off[40];
};

struct file_handle_ {
    unsigned int handle_bytes;
    int handle_type;
    unsigned char f_handle[128];
};

struct cap_header_ { uint32_t version; int pid; };
struct cap_data_ { uint32_t effective, permitted, inheritable; };

struct timex_ {  /* struct timex is 208 bytes on x86_64; modes == 0 only reads */
    unsigned int modes;
    char rest[204];
};

static int report(long ret) {
    if (ret == -1) {
        const char *name = strerrorname_np(errno);
        printf("errno=%s\n", name ? name : "unknown");
    } else {
        printf("ok %ld\n", ret);
    }
    return 0;
}

/* A syscall that may create a process: the child leaves at once, the parent reaps it. */
static int report_fork(long ret) {
    if (ret == 0)
        _exit(0);
    if (ret > 0)
        waitpid((pid_t)ret, NULL, __WALL);
    return report(ret);
}

static long int80(long nr, long a, long b, long c) {
    long ret;
    __asm__ volatile("int $0x80" : "=a"(ret) : "a"(nr), "b"(a), "c"(b), "d"(c) : "memory");
    return ret;
}

/* Copy /bin/echo into fd (a file in a writable mount, a memfd): the program the exec probes
 * try to run from there. Returns fd, or -1 with errno set. */
static int copy_echo(int fd) {
    char chunk[65536];
    ssize_t n;
    int src = open("/bin/echo", O_RDONLY | O_CLOEXEC);
    if (src < 0 || fd < 0)
        return -1;
    while ((n = read(src, chunk, sizeof chunk)) > 0)
        if (write(fd, chunk, (size_t)n) != n)
            return -1;
    close(src);
    return n < 0 ? -1 : fd;
}

/* The copy of /bin/echo at path, executable, closed (an open writer would make exec ETXTBSY). */
static int copy_echo_to(const char *path) {
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0755);
    if (copy_echo(fd) < 0)
        return -1;
    return close(fd);
}

static char *const WORKED[] = {"echo", "exec-worked", NULL};

/* exec through /proc/self/fd/N: what fexecve(3) falls back to without execveat */
static long exec_fd_path(int fd) {
    char path[64];
    snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
    return syscall(SYS_execve, path, WORKED, environ);
}

static long socket_(const char *spec) {  /* "family,type,protocol", numbers as strtoul reads them */
    char *end;
    unsigned long family = strtoul(spec, &end, 0);
    unsigned long type = strtoul(end + (*end == ','), &end, 0);
    unsigned long protocol = strtoul(end + (*end == ','), &end, 0);
    long fd = syscall(SYS_socket, family, type, protocol);
    if (fd >= 0)
        close((int)fd);
    return fd < 0 ? fd : 0;
}

static long unshare_(unsigned long flags) { return syscall(SYS_unshare, flags); }
static long clone_(unsigned long flags) { return syscall(SYS_clone, flags | SIGCHLD, 0, 0, 0, 0); }

static long clone3_(uint64_t flags) {
    struct clone_args_ args;
    memset(&args, 0, sizeof args);
    args.flags = flags;
    args.exit_signal = SIGCHLD;
    return syscall(SYS_clone3, &args, sizeof args);
}

static int probe(const char *name, const char *arg) {
    char buf[256] = {0};
    int devnull = open("/dev/null", O_RDWR | O_CLOEXEC);
#define IS(n) (strcmp(name, n) == 0)
    /* -- mounts ------------------------------------------------------------------------ */
    if (IS("mount-tmpfs"))
        return report(syscall(SYS_mount, "none", "/tmp", "tmpfs", 0UL, ""));
    if (IS("mount-cgroup-v1"))  /* the release_agent escape starts with a cgroup v1 mount */
        return report(syscall(SYS_mount, "cgroup", "/tmp", "cgroup", 0UL, "memory"));
    if (IS("mount-cgroup2"))
        return report(syscall(SYS_mount, "cgroup2", "/tmp", "cgroup2", 0UL, ""));
    if (IS("mount-bind-root"))
        return report(syscall(SYS_mount, "/", "/tmp", NULL, MS_BIND_ | MS_REC_, NULL));
    if (IS("umount"))  /* arg: a masked path */
        return report(syscall(SYS_umount2, arg, MNT_DETACH_));
    if (IS("remount-rw"))  /* arg: a read-only bind; clearing MS_RDONLY asks for rw */
        return report(syscall(SYS_mount, NULL, arg, NULL, MS_REMOUNT_ | MS_BIND_, NULL));
    if (IS("mount-setattr-rw")) {
        struct mount_attr_ attr = {.attr_clr = MOUNT_ATTR_RDONLY_};
        return report(syscall(SYS_mount_setattr, AT_FDCWD, arg, 0, &attr, sizeof attr));
    }
    if (IS("fsopen"))
        return report(syscall(SYS_fsopen, "tmpfs", 0));
    if (IS("fsmount"))  /* EBADF from the kernel if the filter let it through */
        return report(syscall(SYS_fsmount, -1, 0, 0));
    if (IS("fspick"))
        return report(syscall(SYS_fspick, AT_FDCWD, "/usr", 0));
    if (IS("open-tree"))
        return report(syscall(SYS_open_tree, AT_FDCWD, "/usr", OPEN_TREE_CLONE_));
    if (IS("move-mount"))
        return report(syscall(SYS_move_mount, AT_FDCWD, "/proc/kcore", AT_FDCWD, "/tmp", 0));
    if (IS("pivot-root"))
        return report(syscall(SYS_pivot_root, "/tmp", "/tmp"));
    if (IS("chroot"))
        return report(syscall(SYS_chroot, "/tmp"));
    /* -- namespaces ---------------------------------------------------------------------- */
    if (IS("unshare-user")) return report(unshare_(CLONE_NEWUSER_));
    if (IS("unshare-mount")) return report(unshare_(CLONE_NEWNS_));
    if (IS("unshare-net")) return report(unshare_(CLONE_NEWNET_));
    if (IS("unshare-pid")) return report(unshare_(CLONE_NEWPID_));
    if (IS("unshare-uts")) return report(unshare_(CLONE_NEWUTS_));
    if (IS("unshare-ipc")) return report(unshare_(CLONE_NEWIPC_));
    if (IS("unshare-cgroup")) return report(unshare_(CLONE_NEWCGROUP_));
    if (IS("unshare-time")) return report(unshare_(CLONE_NEWTIME_));
    if (IS("clone-newuser")) return report_fork(clone_(CLONE_NEWUSER_));
    if (IS("clone-newns")) return report_fork(clone_(CLONE_NEWNS_));
    if (IS("clone-newnet")) return report_fork(clone_(CLONE_NEWNET_));
    if (IS("clone-newpid")) return report_fork(clone_(CLONE_NEWPID_));
    if (IS("clone-newuser-highbits"))  /* upper half set: the flags are still the low half */
        return report_fork(clone_(CLONE_NEWUSER_ | 0xffffffff00000000UL));
    if (IS("clone-plain")) return report_fork(clone_(0));  /* the control: must work */
    if (IS("clone3")) return report_fork(clone3_(0));
    if (IS("clone3-newuser")) return report_fork(clone3_(CLONE_NEWUSER_));
    if (IS("setns"))  /* fd 0 is not a namespace: EINVAL if the kernel saw the call */
        return report(syscall(SYS_setns, 0, 0));
    /* -- other processes' memory ----------------------------------------------------------- */
    if (IS("ptrace-traceme"))
        return report(syscall(SYS_ptrace, 0 /* PTRACE_TRACEME */, 0, 0, 0));
    if (IS("ptrace-attach-parent")) {  /* the plugin host: same uid, dumpable */
        long ret = syscall(SYS_ptrace, 16 /* PTRACE_ATTACH */, getppid(), 0, 0);
        if (ret == 0) {
            waitpid(getppid(), NULL, __WALL);
            syscall(SYS_ptrace, 17 /* PTRACE_DETACH */, getppid(), 0, 0);
        }
        return report(ret);
    }
    if (IS("process-vm-readv") || IS("process-vm-writev")) {
        char other[16] = "plugin memory";
        struct iovec local = {buf, sizeof other}, remote = {other, sizeof other};
        long nr = IS("process-vm-readv") ? SYS_process_vm_readv : SYS_process_vm_writev;
        return report(syscall(nr, getpid(), &local, 1UL, &remote, 1UL, 0UL));
    }
    if (IS("kcmp"))
        return report(syscall(SYS_kcmp, getpid(), getppid(), KCMP_FILE_, 0, 0));
    if (IS("pidfd-getfd")) {  /* would copy the plugin host's RPC socket (its fd 3) */
        long pidfd = syscall(SYS_pidfd_open, getppid(), 0);
        if (pidfd < 0)
            return report(pidfd);
        return report(syscall(SYS_pidfd_getfd, pidfd, 3, 0));
    }
    if (IS("process-madvise"))
        return report(syscall(SYS_process_madvise, -1, NULL, 0UL, 0, 0U));
    /* -- kernel interfaces -------------------------------------------------------------- */
    if (IS("keyctl"))
        return report(syscall(SYS_keyctl, KEYCTL_GET_KEYRING_ID_, KEY_SPEC_SESSION_KEYRING_, 1));
    if (IS("add-key"))
        return report(syscall(SYS_add_key, "user", "probe", "x", 1UL, KEY_SPEC_PROCESS_KEYRING_));
    if (IS("request-key"))
        return report(syscall(SYS_request_key, "user", "probe", NULL, 0L));
    if (IS("bpf")) {
        struct bpf_map_create_attr_ attr;
        memset(&attr, 0, sizeof attr);
        attr.map_type = BPF_MAP_TYPE_ARRAY_;
        attr.key_size = attr.value_size = 4;
        attr.max_entries = 1;
        return report(syscall(SYS_bpf, BPF_MAP_CREATE_, &attr, 72U));
    }
    if (IS("perf-event-open")) {  /* its own CPU clock, user space only: paranoid 2 allows it */
        struct perf_event_attr_ attr;
        memset(&attr, 0, sizeof attr);
        attr.type = PERF_TYPE_SOFTWARE_;
        attr.size = 64;  /* PERF_ATTR_SIZE_VER0 */
        attr.flags = (1UL << 5) | (1UL << 6);  /* exclude_kernel, exclude_hv */
        return report(syscall(SYS_perf_event_open, &attr, 0, -1, -1, 0UL));
    }
    if (IS("init-module"))
        return report(syscall(SYS_init_module, buf, 0UL, ""));
    if (IS("finit-module"))
        return report(syscall(SYS_finit_module, devnull, "", 0));
    if (IS("delete-module"))
        return report(syscall(SYS_delete_module, "probe", 0));
    if (IS("kexec-load"))
        return report(syscall(SYS_kexec_load, 0UL, 0UL, NULL, 0UL));
    if (IS("kexec-file-load"))
        return report(syscall(SYS_kexec_file_load, devnull, devnull, 1UL, "", 0UL));
    if (IS("io-uring-setup")) {
        struct io_uring_params_ params;
        memset(&params, 0, sizeof params);
        return report(syscall(SYS_io_uring_setup, 4, &params));
    }
    if (IS("io-uring-enter"))
        return report(syscall(SYS_io_uring_enter, devnull, 0, 0, 0, NULL, 0));
    if (IS("io-uring-register"))
        return report(syscall(SYS_io_uring_register, devnull, 0, NULL, 0));
    if (IS("userfaultfd"))  /* user-mode-only faults need no privilege at all */
        return report(syscall(SYS_userfaultfd, O_CLOEXEC | UFFD_USER_MODE_ONLY_));
    if (IS("name-to-handle-at")) {
        struct file_handle_ fh = {.handle_bytes = 128};
        int mount_id;
        return report(syscall(SYS_name_to_handle_at, AT_FDCWD, "/", &fh, &mount_id, 0));
    }
    if (IS("open-by-handle-at")) {
        struct file_handle_ fh = {.handle_bytes = 8, .handle_type = 1};
        return report(syscall(SYS_open_by_handle_at, AT_FDCWD, &fh, O_RDONLY));
    }
    if (IS("fanotify-init"))  /* unprivileged fanotify exists since 5.13 */
        return report(syscall(SYS_fanotify_init, FAN_REPORT_FID_, O_RDONLY));
    if (IS("syslog"))
        return report(syscall(SYS_syslog, SYSLOG_ACTION_SIZE_BUFFER_, NULL, 0));
    if (IS("modify-ldt"))  /* func 0 reads the LDT: allowed to anyone by the kernel */
        return report(syscall(SYS_modify_ldt, 0, buf, sizeof buf));
    if (IS("iopl")) return report(syscall(SYS_iopl, 3));
    if (IS("ioperm")) return report(syscall(SYS_ioperm, 0x80UL, 1UL, 1));
    if (IS("set-mempolicy"))  /* MPOL_DEFAULT: allowed to anyone by the kernel */
        return report(syscall(SYS_set_mempolicy, MPOL_DEFAULT_, NULL, 0UL));
    if (IS("memfd-secret")) return report(syscall(SYS_memfd_secret, 0U));
    if (IS("swapon")) return report(syscall(SYS_swapon, "/dev/null", 0));
    if (IS("acct")) return report(syscall(SYS_acct, NULL));
    if (IS("vhangup")) return report(syscall(SYS_vhangup));
    if (IS("quotactl")) return report(syscall(SYS_quotactl, 0, NULL, 0, NULL));
    /* -- scheduling and limits above the sandbox's share ------------------------------------ */
    if (IS("sched-fifo")) {  /* a real-time spinner would starve the host's CPUs */
        int param[1] = {1};
        return report(syscall(SYS_sched_setscheduler, 0, 1 /* SCHED_FIFO */, param));
    }
    if (IS("nice-minus-20"))
        return report(syscall(SYS_setpriority, 0 /* PRIO_PROCESS */, 0, -20));
    if (IS("ioprio-realtime"))  /* IOPRIO_CLASS_RT << 13 | 0 for IOPRIO_WHO_PROCESS, self */
        return report(syscall(SYS_ioprio_set, 1, 0, (1 << 13) | 0));
    if (IS("raise-nofile")) {  /* above the hard limit the launcher set */
        unsigned long limit[2] = {1UL << 20, 1UL << 20};
        return report(syscall(SYS_prlimit64, 0, 7 /* RLIMIT_NOFILE */, limit, NULL));
    }
    if (IS("shmget"))  /* arg: a System V key the host made in its IPC namespace */
        return report(syscall(SYS_shmget, strtol(arg, NULL, 0), 0UL, 0));
    /* -- personality and foreign ABIs -------------------------------------------------------- */
    if (IS("personality-read-implies-exec"))
        return report(syscall(SYS_personality, READ_IMPLIES_EXEC_));
    if (IS("personality-addr-no-randomize"))
        return report(syscall(SYS_personality, ADDR_NO_RANDOMIZE_));
    if (IS("personality-linux32"))
        return report(syscall(SYS_personality, PER_LINUX32_));
    if (IS("x32-getpid"))
        return report(syscall(X32_SYSCALL_BIT | SYS_getpid));
    if (IS("x32-unshare"))
        return report(syscall(X32_SYSCALL_BIT | SYS_unshare, CLONE_NEWUSER_));
    if (IS("i386-getpid"))  /* getpid is 20 in the i386 table */
        return report(int80(20, 0, 0, 0));
    if (IS("i386-unshare"))  /* unshare is 310 in the i386 table */
        return report(int80(310, (long)CLONE_NEWUSER_, 0, 0));
    /* -- the machine --------------------------------------------------------------------- */
    if (IS("reboot"))
        return report(syscall(SYS_reboot, LINUX_REBOOT_MAGIC1_, LINUX_REBOOT_MAGIC2_,
                              LINUX_REBOOT_CMD_CAD_OFF_, NULL));
    if (IS("clock-settime")) {
        struct timespec now;
        clock_gettime(CLOCK_REALTIME, &now);
        return report(syscall(SYS_clock_settime, CLOCK_REALTIME, &now));
    }
    if (IS("settimeofday")) {
        struct timeval now;
        gettimeofday(&now, NULL);
        return report(syscall(SYS_settimeofday, &now, NULL));
    }
    if (IS("adjtimex")) {  /* modes 0 only reads: allowed to anyone by the kernel */
        struct timex_ tx;
        memset(&tx, 0, sizeof tx);
        return report(syscall(SYS_adjtimex, &tx));
    }
    if (IS("clock-adjtime")) {
        struct timex_ tx;
        memset(&tx, 0, sizeof tx);
        return report(syscall(SYS_clock_adjtime, CLOCK_REALTIME, &tx));
    }
    if (IS("sethostname")) return report(syscall(SYS_sethostname, "pwned", 5UL));
    if (IS("setdomainname")) return report(syscall(SYS_setdomainname, "pwned", 5UL));
    /* -- devices and terminals ------------------------------------------------------------ */
    if (IS("mknod-mem"))  /* /dev/mem is char 1:1 */
        return report(syscall(SYS_mknod, "/tmp/mem", (unsigned long)(S_IFCHR | 0600),
                              (unsigned long)makedev(1, 1)));
    if (IS("mknodat-kmsg"))  /* /dev/kmsg is char 1:11 */
        return report(syscall(SYS_mknodat, AT_FDCWD, "/tmp/kmsg",
                              (unsigned long)(S_IFCHR | 0600), (unsigned long)makedev(1, 11)));
    if (IS("mknod-block"))  /* the host's virtio disk */
        return report(syscall(SYS_mknod, "/tmp/vda", (unsigned long)(S_IFBLK | 0600),
                              (unsigned long)makedev(253, 0)));
    if (IS("mknod-fifo")) {  /* the control: a FIFO is allowed */
        unlink("/tmp/probe-fifo");
        return report(syscall(SYS_mknod, "/tmp/probe-fifo", (unsigned long)(S_IFIFO | 0600), 0UL));
    }
    /* /dev/null is no terminal: a call the kernel saw fails ENOTTY, the filter says EPERM */
    if (IS("tiocsti"))
        return report(syscall(SYS_ioctl, devnull, TIOCSTI_, "x"));
    if (IS("tiocsti-highbits"))
        return report(syscall(SYS_ioctl, devnull, 0xffffffff00000000UL | TIOCSTI_, "x"));
    if (IS("tioclinux"))
        return report(syscall(SYS_ioctl, devnull, TIOCLINUX_, buf));
    if (IS("tiocgwinsz"))  /* the control: an ordinary ioctl reaches the kernel (ENOTTY) */
        return report(syscall(SYS_ioctl, devnull, 0x5413UL, buf));
    /* -- running files the program wrote ------------------------------------------------- */
    if (IS("exec-copy")) {  /* arg: where to put the copy; execve it */
        if (copy_echo_to(arg) < 0)
            return report(-1);
        return report(syscall(SYS_execve, arg, WORKED, environ));
    }
    if (IS("exec-copy-via-ldso")) {  /* the dynamic loader maps the copy itself, no execve of it */
        char *const argv[] = {"ld.so", (char *)arg, "exec-worked", NULL};
        if (copy_echo_to(arg) < 0)
            return report(-1);
        return report(syscall(SYS_execve, "/lib64/ld-linux-x86-64.so.2", argv, environ));
    }
    if (IS("exec-copy-by-fd")) {  /* arg: where to put the copy; exec it through its fd */
        int fd;
        if (copy_echo_to(arg) < 0 || (fd = open(arg, O_RDONLY)) < 0)
            return report(-1);
        return report(exec_fd_path(fd));
    }
    if (IS("exec-tmpfile")) {  /* arg: a directory; an unnamed file in it (O_TMPFILE), exec'd by fd */
        char path[64];
        int fd, ro;
        if ((fd = open(arg, O_TMPFILE | O_RDWR, 0755)) < 0 || copy_echo(fd) < 0)
            return report(-1);
        snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
        if ((ro = open(path, O_RDONLY)) < 0)
            return report(-1);
        close(fd);  /* no writer left, or exec says ETXTBSY */
        return report(exec_fd_path(ro));
    }
    if (IS("memfd-create"))
        return report(syscall(SYS_memfd_create, "probe", 0U));
    if (IS("exec-memfd")) {  /* a file no mount holds, so no noexec covers it */
        long fd = syscall(SYS_memfd_create, "probe", 0U);
        if (fd < 0 || copy_echo((int)fd) < 0)
            return report(-1);
        return report(exec_fd_path((int)fd));
    }
    if (IS("execveat-fd")) {  /* fexecve(3): exec an open file, here /bin/echo itself */
        int fd = open("/bin/echo", O_RDONLY);
        return report(syscall(SYS_execveat, fd, "", WORKED, environ, 0x1000 /* AT_EMPTY_PATH */));
    }
    if (IS("execveat-path"))
        return report(syscall(SYS_execveat, AT_FDCWD, "/bin/echo", WORKED, environ, 0));
    /* -- sockets ------------------------------------------------------------------------ */
    if (IS("socket"))  /* arg: "family,type,protocol" */
        return report(socket_(arg));
    /* -- identity ---------------------------------------------------------------------- */
    if (IS("setuid-0")) return report(syscall(SYS_setuid, 0));
    if (IS("setresuid-0")) return report(syscall(SYS_setresuid, 0, 0, 0));
    if (IS("setgid-0")) return report(syscall(SYS_setgid, 0));
    if (IS("setgroups")) {
        gid_t groups[1] = {0};
        return report(syscall(SYS_setgroups, 1, groups));
    }
    if (IS("setgroups-empty")) return report(syscall(SYS_setgroups, 0, NULL));
    if (IS("capset-all")) {
        struct cap_header_ header = {0x20080522 /* _LINUX_CAPABILITY_VERSION_3 */, 0};
        struct cap_data_ data[2];
        memset(data, 0xff, sizeof data);
        return report(syscall(SYS_capset, &header, data));
    }
    if (IS("euid")) {  /* who this program runs as (for the set-uid and file-caps probes) */
        FILE *status = fopen("/proc/self/status", "r");
        char line[256];
        printf("euid=%d", (int)geteuid());
        while (status && fgets(line, sizeof line, status))
            if (strncmp(line, "CapEff:", 7) == 0)
                printf(" capeff=%s", line + 8);
        return 0;
    }
    fprintf(stderr, "probe: unknown probe %s\n", name);
    return 2;
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: probe NAME [ARG]\n");
        return 2;
    }
    setvbuf(stdout, NULL, _IONBF, 0);
    return probe(argv[1], argc > 2 ? argv[2] : "");
}
