/* A WASI command module as a sandboxer plugin: any program with a main() built for
 * wasm32-wasi. Each call runs it once: argv[1] is the method, stdin holds the call's
 * arguments as a JSON array, and what it prints on stdout is the result (one JSON value).
 * A non-zero exit status fails the call, with its stderr as the message.
 *
 *   upper("hello")   -> "HELLO"   (ASCII letters of the JSON text upper-cased, escapes kept)
 *   length("héllo")  -> {"bytes": N}  (the size of the JSON arguments it was given)
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static char *read_stdin(size_t *len) {
    size_t cap = 4096, n = 0;
    char *buf = malloc(cap);
    size_t got;
    while (buf && (got = fread(buf + n, 1, cap - n, stdin)) > 0) {
        n += got;
        if (n == cap) buf = realloc(buf, cap *= 2);
    }
    *len = n;
    return buf;
}

/* The first argument, when it is a string: its JSON text including the quotes. */
static int first_string(const char *args, size_t len, size_t *start, size_t *end) {
    size_t i = 0;
    while (i < len && (args[i] == '[' || args[i] == ' ')) i++;
    if (i >= len || args[i] != '"') return 0;
    *start = i++;
    while (i < len && args[i] != '"') i += args[i] == '\\' ? 2 : 1;
    if (i >= len) return 0;
    *end = i + 1;
    return 1;
}

int main(int argc, char **argv) {
    const char *method = argc > 1 ? argv[1] : "";
    size_t len;
    char *args = read_stdin(&len);
    if (!args) {
        fprintf(stderr, "out of memory\n");
        return 1;
    }
    if (strcmp(method, "upper") == 0) {
        size_t start, end;
        if (!first_string(args, len, &start, &end)) {
            fprintf(stderr, "upper takes one string\n");
            return 2;
        }
        for (size_t i = start; i < end; i++) {
            if (args[i] == '\\') { putchar(args[i++]); putchar(args[i]); continue; }
            putchar(args[i] >= 'a' && args[i] <= 'z' ? args[i] - 32 : args[i]);
        }
        putchar('\n');
        return 0;
    }
    if (strcmp(method, "length") == 0) {
        printf("{\"bytes\": %zu}\n", len);
        return 0;
    }
    fprintf(stderr, "unknown method %s\n", method);
    return 3;
}
