/* Leaks 10 bytes: LeakSanitizer reports it at exit. */
#include <stdio.h>
#include <stdlib.h>

int main(void) {
    char *p = malloc(10);
    p[0] = 1;
    printf("ran %d\n", p[0]);
    fflush(stdout); /* LeakSanitizer ends the process without flushing stdio */
    return 0;
}
