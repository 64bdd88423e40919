/* An external plugin in C for the guest's load/unload cycles (tests/vm/guest_v2.py).
 *
 * The cycle test is about what a load and an unload leave behind (cgroups, processes), not
 * about any one plugin kind; a python plugin's start-up is seconds of emulated CPU in a TCG
 * guest, this one's is nothing, so the 50 cycles measure sandboxer's own work.
 *
 * It speaks the wire protocol (DESIGN section 7) over fd 3 for the messages its test sends
 * and nothing more: the handshake, then one request per line, answered in order:
 *
 *   f(x)                     -> x + 1 (x an integer)
 *   sandboxer.init(config)   -> null
 *   sandboxer.health()       -> {"ok": true}
 *   sandboxer.shutdown()     -> null, then it exits
 *
 * Anything else is answered with "method not found". The supervisor's encoder writes compact
 * JSON (no spaces), which is all the parsing below understands; the handshake's answer and
 * notifications are skipped.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static const char *field(const char *line, const char *name)
{
    const char *p = strstr(line, name);
    return p ? p + strlen(name) : NULL;
}

int main(void)
{
    const char *cookie = getenv("SANDBOXER_MAGIC_COOKIE");
    if (cookie == NULL || strspn(cookie, "0123456789abcdef") != strlen(cookie)) {
        fputs("cycle-plugin: run me with sandboxer (no SANDBOXER_MAGIC_COOKIE)\n", stderr);
        return 1;
    }
    int out_fd = dup(3);
    FILE *in = fdopen(3, "r"), *out = out_fd < 0 ? NULL : fdopen(out_fd, "w");
    if (in == NULL || out == NULL) {
        perror("cycle-plugin: fd 3");
        return 1;
    }
    fprintf(out, "{\"jsonrpc\":\"2.0\",\"id\":0,\"method\":\"sandboxer.handshake\",\"params\":"
                 "{\"cookie\":\"%s\",\"protocols\":[1],\"plugin\":{\"name\":\"vm-cycle\","
                 "\"version\":\"1.0.0\"},\"methods\":[\"f\"]}}\n", cookie);
    fflush(out);

    static char line[1 << 16];
    while (fgets(line, sizeof line, in) != NULL) {
        const char *method = field(line, "\"method\":\""), *id = field(line, "\"id\":");
        if (method == NULL || id == NULL || strncmp(method, "sandboxer.cancel\"", 17) == 0)
            continue;  /* no method: the handshake's answer; cancel is a notification */
        int id_len = (int)strcspn(id, ",}");
        int shutdown = 0;
        fprintf(out, "{\"jsonrpc\":\"2.0\",\"id\":%.*s,", id_len, id);
        if (strncmp(method, "f\"", 2) == 0) {
            const char *params = field(line, "\"params\":[");
            fprintf(out, "\"result\":%lld}\n", (params ? strtoll(params, NULL, 10) : 0) + 1);
        } else if (strncmp(method, "sandboxer.init\"", 15) == 0) {
            fputs("\"result\":null}\n", out);
        } else if (strncmp(method, "sandboxer.health\"", 17) == 0) {
            fputs("\"result\":{\"ok\":true}}\n", out);
        } else if (strncmp(method, "sandboxer.shutdown\"", 19) == 0) {
            fputs("\"result\":null}\n", out);
            shutdown = 1;
        } else {
            fputs("\"error\":{\"code\":-32601,\"message\":\"method not found\"}}\n", out);
        }
        fflush(out);
        if (shutdown)
            break;
    }
    return 0;
}
