/* A wasm plugin in C that fetches URLs through sandboxer's http_request host function.
 *
 * wasm has no sockets: the host performs the request, under the same allow-list as the
 * egress proxy of sandboxed processes (the manifest's allowed_hosts), and logs and counts it.
 *
 *   int32_t sandboxer_http_request(const char *request_json, int32_t len);
 *       performs the request; returns the length of the response JSON, which the host keeps
 *       (for this instance) until the next http_request.
 *   int32_t sandboxer_http_response(char *buf, int32_t cap);
 *       copies min(length, cap) bytes of that response JSON into buf; returns how many.
 *
 * Request:  {"method": "GET", "url": "https://host/path", "headers": {"Name": "value"},
 *            "body": "text"}  (or "body_base64"; method defaults to GET)
 * Response: {"status": 200, "headers": {"content-type": "..."}, "body": "..."} ("body_base64"
 *           when the body is not UTF-8), or {"error": {"kind": "refused" | "failed" |
 *           "invalid" | "timeout", "message": "..."}}. Redirects are returned, not followed.
 *
 * fetch(url) -> {"status": n, "body": "..."}; a refused or failed request is an error reply.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

__attribute__((import_module("sandboxer"), import_name("http_request")))
int32_t sandboxer_http_request(const char *request, int32_t len);
__attribute__((import_module("sandboxer"), import_name("http_response")))
int32_t sandboxer_http_response(char *buf, int32_t cap);

#define EXPORT(name) __attribute__((export_name(name)))

static char *reply_buf;
static size_t reply_cap;

EXPORT("sandboxer_alloc") void *plugin_alloc(int32_t len) { return malloc((size_t)len); }
EXPORT("sandboxer_free") void plugin_free(void *ptr, int32_t len) { (void)len; free(ptr); }

/* The reply: the pieces concatenated, packed as ptr << 32 | len; valid until the next call. */
static int64_t reply(int count, const char *const *parts, const size_t *lens) {
    size_t n = 0;
    for (int i = 0; i < count; i++) n += lens[i];
    if (n > reply_cap) {
        char *bigger = realloc(reply_buf, n);
        if (!bigger) {
            static const char oom[] = "{\"error\":{\"code\":12,\"message\":\"out of memory\"}}";
            return (int64_t)(uintptr_t)oom << 32 | (int64_t)(sizeof oom - 1);
        }
        reply_buf = bigger;
        reply_cap = n;
    }
    size_t at = 0;
    for (int i = 0; i < count; i++) {
        memcpy(reply_buf + at, parts[i], lens[i]);
        at += lens[i];
    }
    return (int64_t)(uintptr_t)reply_buf << 32 | (int64_t)n;
}

static int64_t error(const char *message) {
    const char *parts[] = {"{\"error\":{\"code\":1,\"message\":\"", message, "\"}}"};
    size_t lens[] = {strlen(parts[0]), strlen(message), 3};
    return reply(3, parts, lens);
}

/* Past one JSON string starting at s[0] == '"'; NULL if it does not end before end. */
static const char *skip_string(const char *s, const char *end) {
    for (s++; s < end; s++) {
        if (*s == '\\') s++;
        else if (*s == '"') return s + 1;
    }
    return NULL;
}

/* Past one JSON value (the host's compact JSON: no whitespace). */
static const char *skip_value(const char *s, const char *end) {
    if (s >= end) return NULL;
    if (*s == '"') return skip_string(s, end);
    if (*s == '{' || *s == '[') {
        int depth = 0;
        while (s < end) {
            if (*s == '"') {
                s = skip_string(s, end);
                if (!s) return NULL;
                continue;
            }
            if (*s == '{' || *s == '[') depth++;
            if (*s == '}' || *s == ']') depth--;
            s++;
            if (depth == 0) return s;
        }
        return NULL;
    }
    while (s < end && *s != ',' && *s != '}' && *s != ']') s++;
    return s;
}

/* The raw value of a top-level key of the JSON object in [s, end): 1 and [*v, *v_end). */
static int member(const char *s, const char *end, const char *key, const char **v,
                  const char **v_end) {
    size_t key_len = strlen(key);
    if (s >= end || *s != '{') return 0;
    s++;
    while (s < end && *s == '"') {
        const char *name = s + 1, *after = skip_string(s, end);
        if (!after || after >= end || *after != ':') return 0;
        const char *value = after + 1, *value_end = skip_value(value, end);
        if (!value_end) return 0;
        if ((size_t)(after - 1 - name) == key_len && memcmp(name, key, key_len) == 0) {
            *v = value;
            *v_end = value_end;
            return 1;
        }
        s = value_end < end && *value_end == ',' ? value_end + 1 : end;
    }
    return 0;
}

/* fetch(url): GET url, reply {"status": n, "body": "..."}. */
EXPORT("fetch") int64_t plugin_fetch(const char *args, int32_t len) {
    /* args is ["<url>"]: the URL, still JSON-escaped, goes into the request as it is. */
    if (len < 4 || args[0] != '[' || args[1] != '"') return error("fetch takes one URL");
    const char *url_end = skip_string(args + 1, args + len);
    if (!url_end) return error("fetch takes one URL");
    static const char head[] = "{\"method\":\"GET\",\"url\":";
    size_t url_len = (size_t)(url_end - (args + 1));
    size_t request_len = sizeof head - 1 + url_len + 1;
    char *request = malloc(request_len);
    if (!request) return error("out of memory");
    memcpy(request, head, sizeof head - 1);
    memcpy(request + sizeof head - 1, args + 1, url_len);
    request[request_len - 1] = '}';

    int32_t n = sandboxer_http_request(request, (int32_t)request_len);
    free(request);
    char *response = malloc((size_t)n + 1);
    if (!response) return error("out of memory");
    int32_t got = sandboxer_http_response(response, n);
    const char *end = response + got, *v, *v_end, *m, *m_end;

    int64_t packed;
    if (member(response, end, "error", &v, &v_end)) {
        /* {"kind": "...", "message": "..."} -> "<kind>: <message>" */
        const char *k, *k_end;
        if (member(v, v_end, "kind", &k, &k_end) && member(v, v_end, "message", &m, &m_end)) {
            const char *parts[] = {"{\"error\":{\"code\":1,\"message\":", k, ": ", m + 1, "}}"};
            size_t lens[] = {strlen(parts[0]), (size_t)(k_end - 1 - k), 2,
                             (size_t)(m_end - m - 1), 2};
            packed = reply(5, parts, lens);
        } else {
            packed = error("http_request failed");
        }
    } else if (member(response, end, "status", &v, &v_end)) {
        const char *key = "body";
        if (!member(response, end, "body", &m, &m_end)) {
            key = "body_base64";
            if (!member(response, end, key, &m, &m_end)) { m = "\"\""; m_end = m + 2; }
        }
        const char *parts[] = {"{\"result\":{\"status\":", v, ",\"", key, "\":", m, "}}"};
        size_t lens[] = {strlen(parts[0]), (size_t)(v_end - v), 2, strlen(key), 2,
                         (size_t)(m_end - m), 2};
        packed = reply(7, parts, lens);
    } else {
        packed = error("http_request returned something unexpected");
    }
    free(response);
    return packed;
}
