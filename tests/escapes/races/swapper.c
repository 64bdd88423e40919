/* The attacker of the race probes (tests/escapes/test_races.py): an unprivileged user who
 * owns a directory swaps two of its entries as fast as it can.
 *
 *   swapper DIR UID GID NAME_A NAME_B
 *
 * Started as root, it opens DIR, then becomes UID:GID for good (no supplementary groups, no
 * capabilities left), so every swap is one the unprivileged owner of DIR could make; it
 * never needs to reach DIR by name, so the directories above it need not be searchable by
 * UID. It then exchanges NAME_A and NAME_B with renameat2(RENAME_EXCHANGE) in a loop (a
 * directory and a symlink trade places atomically: at every instant one name is the
 * directory and the other the link) until SIGTERM, then swaps once more if needed so that
 * both names are back where they started, and prints the number of swaps.
 *
 * Output: "ready uid=U euid=U" once it runs as the attacker, "swaps=N" at the end. Any
 * failure is a line on stderr and exit status 2.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>

#ifndef RENAME_EXCHANGE
#define RENAME_EXCHANGE (1 << 1)
#endif

static volatile sig_atomic_t stop;

static void on_term(int sig)
{
    (void)sig;
    stop = 1;
}

static int exchange(int dir, const char *a, const char *b)
{
    /* syscall() rather than glibc's renameat2: the number is the same on every glibc. */
    return (int)syscall(SYS_renameat2, dir, a, dir, b, RENAME_EXCHANGE);
}

int main(int argc, char **argv)
{
    if (argc != 6) {
        fputs("usage: swapper DIR UID GID NAME_A NAME_B\n", stderr);
        return 2;
    }
    uid_t uid = (uid_t)strtoul(argv[2], NULL, 10);
    gid_t gid = (gid_t)strtoul(argv[3], NULL, 10);
    const char *a = argv[4], *b = argv[5];
    int dir = open(argv[1], O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dir < 0) {
        fprintf(stderr, "swapper: open %s: %s\n", argv[1], strerror(errno));
        return 2;
    }
    if (setgroups(0, NULL) != 0 || setresgid(gid, gid, gid) != 0
            || setresuid(uid, uid, uid) != 0) {
        fprintf(stderr, "swapper: becoming %u:%u: %s\n", uid, gid, strerror(errno));
        return 2;
    }
    if (getuid() != uid || geteuid() != uid || setresuid(0, 0, 0) == 0) {
        fputs("swapper: still privileged after dropping to the attacker's uid\n", stderr);
        return 2;
    }
    /* Die with the test (set after the uid change, which clears it); a swapper left running
     * would go on racing whatever the next test does. */
    if (prctl(PR_SET_PDEATHSIG, SIGKILL) != 0 || getppid() == 1) {
        fputs("swapper: the test that started it is gone\n", stderr);
        return 2;
    }
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_term;  /* no SA_RESTART: nothing here blocks anyway */
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    printf("ready uid=%u euid=%u\n", getuid(), geteuid());
    fflush(stdout);

    unsigned long long swaps = 0;
    while (!stop) {
        if (exchange(dir, a, b) != 0) {
            if (errno == EINTR)
                continue;
            fprintf(stderr, "swapper: renameat2(%s, %s, RENAME_EXCHANGE) after %llu swaps: "
                            "%s\n", a, b, swaps, strerror(errno));
            return 2;
        }
        swaps++;
    }
    if (swaps % 2 == 1) {
        while (exchange(dir, a, b) != 0) {
            if (errno != EINTR) {
                fprintf(stderr, "swapper: swapping back: %s\n", strerror(errno));
                return 2;
            }
        }
    }
    printf("swaps=%llu\n", swaps);
    return 0;
}
