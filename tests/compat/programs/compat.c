/* What a C program of a test suite does: processes, threads, pipes, signals, memory maps,
 * files in /tmp, a shared library loaded at run time. Prints one line per step. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

extern char **environ;
static volatile sig_atomic_t got;
static void on_usr1(int sig) { got = sig; }
static void *square(void *arg) { long n = (long)arg; return (void *)(n * n); }

int main(int argc, char **argv) {
    /* threads */
    pthread_t t[4];
    long sum = 0;
    for (long i = 0; i < 4; i++) pthread_create(&t[i], NULL, square, (void *)(i + 1));
    for (int i = 0; i < 4; i++) { void *r; pthread_join(t[i], &r); sum += (long)r; }
    printf("threads: %ld\n", sum);

    /* fork, a pipe, an exit status */
    int fds[2];
    pipe(fds);
    pid_t pid = fork();
    if (pid == 0) { write(fds[1], "from the child", 14); _exit(42); }
    char buf[64] = {0};
    close(fds[1]);
    read(fds[0], buf, sizeof buf - 1);
    int status;
    waitpid(pid, &status, 0);
    printf("fork: %s, exit %d\n", buf, WEXITSTATUS(status));

    /* posix_spawn and exec */
    char *args[] = {"sh", "-c", "echo spawned $0", "sh", NULL};
    posix_spawnp(&pid, "sh", NULL, NULL, args, environ);
    waitpid(pid, &status, 0);
    fflush(stdout);

    /* signals */
    struct sigaction sa = {.sa_handler = on_usr1};
    sigaction(SIGUSR1, &sa, NULL);
    raise(SIGUSR1);
    printf("signal: caught %d\n", got);
    pid = fork();
    if (pid == 0) { pause(); _exit(0); }
    kill(pid, SIGTERM);
    waitpid(pid, &status, 0);
    printf("signal: child killed by %d\n", WTERMSIG(status));

    /* shared anonymous memory across fork, a file mapping in /tmp */
    int *shared = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if ((pid = fork()) == 0) { *shared = 7; _exit(0); }
    waitpid(pid, &status, 0);
    printf("mmap shared: %d\n", *shared);
    int fd = open("/tmp/compat-mapped", O_RDWR | O_CREAT | O_TRUNC, 0600);
    ftruncate(fd, 4096);
    char *map = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    strcpy(map, "written through a map");
    msync(map, 4096, MS_SYNC);
    pread(fd, buf, 21, 0);
    buf[21] = 0;
    printf("mmap file: %s\n", buf);

    /* a unix socket pair, a named socket */
    int sv[2];
    socketpair(AF_UNIX, SOCK_STREAM, 0, sv);
    write(sv[0], "ping", 4);
    memset(buf, 0, sizeof buf);
    read(sv[1], buf, 4);
    printf("socketpair: %s\n", buf);

    /* clocks */
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    struct timespec nap = {0, 10 * 1000 * 1000};
    nanosleep(&nap, NULL);
    clock_gettime(CLOCK_MONOTONIC, &b);
    long elapsed = (b.tv_sec - a.tv_sec) * 1000000000L + b.tv_nsec - a.tv_nsec;
    printf("clock: monotonic advanced %d\n", elapsed >= 10000000L);

    /* a shared library built beside us, loaded at run time */
    if (argc > 1) {
        void *lib = dlopen(argv[1], RTLD_NOW);
        if (!lib) { printf("dlopen: %s\n", dlerror()); return 1; }
        int (*answer)(void) = (int (*)(void))dlsym(lib, "answer");
        printf("dlopen: answer %d\n", answer());
    }
    fprintf(stderr, "to stderr\n");
    return 3;
}
