/* A wasm plugin in C on sandboxer's JSON ABI, built with Debian's clang for wasm32-wasi.
 *
 * Every method takes (ptr, len): the call's arguments as a UTF-8 JSON array in this module's
 * memory, written there by the host into a buffer from sandboxer_alloc. It returns
 * ptr << 32 | len of a JSON object {"result": ...} or {"error": {"code": n, "message": s}}
 * that stays valid until the next call (one reply buffer, reused). printf goes to the host's
 * log through WASI; sandboxer_log and sandboxer_config_get are host functions.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

__attribute__((import_module("sandboxer"), import_name("log")))
void sandboxer_log(int32_t level, const char *message, int32_t len);
__attribute__((import_module("sandboxer"), import_name("config_get")))
int32_t sandboxer_config_get(const char *key, int32_t key_len, char *buf, int32_t cap);

#define EXPORT(name) __attribute__((export_name(name)))

static char *reply_buf;
static size_t reply_cap;
static long long counter;

EXPORT("sandboxer_alloc") void *plugin_alloc(int32_t len) { return malloc((size_t)len); }
EXPORT("sandboxer_free") void plugin_free(void *ptr, int32_t len) { (void)len; free(ptr); }

/* The reply: prefix + body + suffix, packed as ptr << 32 | len. */
static int64_t reply(const char *prefix, const char *body, size_t body_len, const char *suffix) {
    size_t a = strlen(prefix), c = strlen(suffix), n = a + body_len + c;
    if (n > reply_cap) {
        char *bigger = realloc(reply_buf, n);
        if (!bigger) return reply("{\"error\":{\"code\":12,\"message\":\"out of memory\"}}", "", 0, "");
        reply_buf = bigger;
        reply_cap = n;
    }
    memcpy(reply_buf, prefix, a);
    memcpy(reply_buf + a, body, body_len);
    memcpy(reply_buf + a + body_len, suffix, c);
    return (int64_t)(uintptr_t)reply_buf << 32 | (int64_t)n;
}

static int64_t error(int code, const char *message) {
    char text[256];
    snprintf(text, sizeof text, "{\"error\":{\"code\":%d,\"message\":\"%s\"}}", code, message);
    return reply(text, "", 0, "");
}

static void log_text(int level, const char *text) { sandboxer_log(level, text, (int32_t)strlen(text)); }

/* The first argument when it is a JSON string: its raw (still escaped) contents. */
static int first_string(const char *args, size_t len, const char **start, size_t *n) {
    if (len < 4 || args[0] != '[' || args[1] != '"') return 0;
    size_t i = 2;
    while (i < len && args[i] != '"') i += args[i] == '\\' ? 2 : 1;
    if (i >= len) return 0;
    *start = args + 2;
    *n = i - 2;
    return 1;
}

EXPORT("init") int64_t plugin_init(const char *args, int32_t len) {
    (void)args; (void)len;
    printf("wasm-c: initialised\n");
    fflush(stdout);
    log_text(1, "wasm-c: init through sandboxer.log");
    return reply("{\"result\":null}", "", 0, "");
}

EXPORT("health_check") int64_t plugin_health(const char *args, int32_t len) {
    (void)args; (void)len;
    return reply("{\"result\":true}", "", 0, "");
}

EXPORT("greet") int64_t plugin_greet(const char *args, int32_t len) {
    const char *name;
    size_t name_len;
    if (!first_string(args, (size_t)len, &name, &name_len))
        return error(-32602, "greet takes one string");
    char greeting[128] = "\"Hello\"";
    int32_t got = sandboxer_config_get("greeting", 8, greeting, sizeof greeting - 1);
    if (got > 0 && got < (int32_t)sizeof greeting) greeting[got] = 0;
    if (greeting[0] != '"') return error(1, "config greeting must be a string");
    greeting[strlen(greeting) - 1] = 0; /* drop the closing quote */
    char prefix[160];
    snprintf(prefix, sizeof prefix, "{\"result\":\"%s, ", greeting + 1);
    return reply(prefix, name, name_len, "!\"}");
}

EXPORT("echo") int64_t plugin_echo(const char *args, int32_t len) {
    return reply("{\"result\":", args, (size_t)len, "}");
}

EXPORT("count") int64_t plugin_count(const char *args, int32_t len) {
    (void)args; (void)len;
    char text[64];
    snprintf(text, sizeof text, "{\"result\":%lld}", ++counter);
    return reply(text, "", 0, "");
}

EXPORT("export_state") int64_t plugin_export_state(const char *args, int32_t len) {
    (void)args; (void)len;
    char text[64];
    snprintf(text, sizeof text, "{\"result\":{\"counter\":%lld}}", counter);
    return reply(text, "", 0, "");
}

EXPORT("import_state") int64_t plugin_import_state(const char *args, int32_t len) {
    /* args: [{"counter": n}, "from_version"] */
    const char *key = strstr(args, "\"counter\":");
    if (!key || key >= args + len) return error(1, "state has no counter");
    counter = strtoll(key + 10, NULL, 10);
    return reply("{\"result\":null}", "", 0, "");
}

EXPORT("fail") int64_t plugin_fail(const char *args, int32_t len) {
    (void)args; (void)len;
    return error(7, "asked to fail");
}

EXPORT("crash") int64_t plugin_crash(const char *args, int32_t len) {
    (void)args; (void)len;
    __builtin_trap();
}
