/*
 * example.native-c: the smallest native sandboxer plugin, in plain C.
 *
 * Implements the C ABI of sandboxer's native kind (DESIGN section 4): every method takes a
 * JSON array of positional arguments and answers a JSON result (status 0) or a JSON error
 * object {"code": int, "message": str} (any other status), in a buffer it allocates with
 * malloc and the host hands back to sandboxer_free.
 *
 *   greet(name)  -> "Hello, NAME!"   (the greeting comes from init's config, default "Hello")
 *   add(a, b)    -> a + b            (numbers; doubles, so integers are exact up to 2^53)
 *   crash()      -> dereferences NULL: a real SIGSEGV that kills the process
 *   fail()       -> always fails with error code 7
 *
 * Everything the host passes in is parsed by a small, length-bounded JSON reader: input is
 * never assumed to be NUL-terminated, strings are built in growable buffers, and nesting is
 * capped, so malformed input gets an error answer, never an overrun. Not thread-safe (the
 * ABI does not ask it to be): the greeting is process-global.
 */

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_DEPTH 64
#define MAX_ARGS 4
#define MAX_GREETING 1024

/* ------------------------------------------------------------------ growable byte buffer */

typedef struct {
    uint8_t *data;
    size_t len, cap;
    int failed; /* set on allocation failure; every later append is a no-op */
} buf_t;

static void buf_append(buf_t *b, const void *src, size_t n) {
    if (b->failed || n == 0)
        return;
    if (n > SIZE_MAX - b->len) {
        b->failed = 1;
        return;
    }
    if (b->len + n > b->cap) {
        size_t cap = b->cap ? b->cap : 64;
        while (cap < b->len + n) {
            if (cap > SIZE_MAX / 2) {
                b->failed = 1;
                return;
            }
            cap *= 2;
        }
        uint8_t *grown = realloc(b->data, cap);
        if (!grown) {
            b->failed = 1;
            return;
        }
        b->data = grown;
        b->cap = cap;
    }
    memcpy(b->data + b->len, src, n);
    b->len += n;
}

static void buf_puts(buf_t *b, const char *s) { buf_append(b, s, strlen(s)); }

static void buf_putc(buf_t *b, uint8_t c) { buf_append(b, &c, 1); }

static void buf_release(buf_t *b) {
    free(b->data);
    b->data = NULL;
    b->len = b->cap = 0;
}

/* Appends bytes as the inside of a JSON string: quotes, backslashes and control characters
 * escaped; other bytes (UTF-8 included) copied as they are. */
static void buf_put_escaped(buf_t *b, const uint8_t *s, size_t n) {
    for (size_t i = 0; i < n; i++) {
        uint8_t c = s[i];
        switch (c) {
        case '"': buf_puts(b, "\\\""); break;
        case '\\': buf_puts(b, "\\\\"); break;
        case '\n': buf_puts(b, "\\n"); break;
        case '\r': buf_puts(b, "\\r"); break;
        case '\t': buf_puts(b, "\\t"); break;
        case '\b': buf_puts(b, "\\b"); break;
        case '\f': buf_puts(b, "\\f"); break;
        default:
            if (c < 0x20) {
                char esc[7];
                snprintf(esc, sizeof esc, "\\u%04x", c);
                buf_puts(b, esc);
            } else {
                buf_putc(b, c);
            }
        }
    }
}

/* ------------------------------------------------------------------ length-bounded JSON reader */

typedef struct {
    const uint8_t *p, *end;
} cursor_t;

static void skip_ws(cursor_t *c) {
    while (c->p < c->end && (*c->p == ' ' || *c->p == '\t' || *c->p == '\n' || *c->p == '\r'))
        c->p++;
}

static int peek(const cursor_t *c) { return c->p < c->end ? *c->p : -1; }

static int eat(cursor_t *c, uint8_t ch) {
    skip_ws(c);
    if (peek(c) != ch)
        return 0;
    c->p++;
    return 1;
}

static int hex4(cursor_t *c, unsigned *out) {
    unsigned v = 0;
    if (c->end - c->p < 4)
        return 0;
    for (int i = 0; i < 4; i++) {
        uint8_t h = *c->p++;
        v <<= 4;
        if (h >= '0' && h <= '9') v |= (unsigned)(h - '0');
        else if (h >= 'a' && h <= 'f') v |= (unsigned)(h - 'a' + 10);
        else if (h >= 'A' && h <= 'F') v |= (unsigned)(h - 'A' + 10);
        else return 0;
    }
    *out = v;
    return 1;
}

static void put_utf8(buf_t *b, unsigned cp) {
    uint8_t u[4];
    size_t n;
    if (cp < 0x80) { u[0] = (uint8_t)cp; n = 1; }
    else if (cp < 0x800) { u[0] = (uint8_t)(0xC0 | cp >> 6); u[1] = (uint8_t)(0x80 | (cp & 0x3F)); n = 2; }
    else if (cp < 0x10000) {
        u[0] = (uint8_t)(0xE0 | cp >> 12); u[1] = (uint8_t)(0x80 | ((cp >> 6) & 0x3F));
        u[2] = (uint8_t)(0x80 | (cp & 0x3F)); n = 3;
    } else {
        u[0] = (uint8_t)(0xF0 | cp >> 18); u[1] = (uint8_t)(0x80 | ((cp >> 12) & 0x3F));
        u[2] = (uint8_t)(0x80 | ((cp >> 6) & 0x3F)); u[3] = (uint8_t)(0x80 | (cp & 0x3F)); n = 4;
    }
    buf_append(b, u, n);
}

/* Reads a JSON string at the cursor; its decoded bytes go to `out` unless it is NULL. */
static int read_string(cursor_t *c, buf_t *out) {
    if (!eat(c, '"'))
        return 0;
    while (c->p < c->end) {
        uint8_t ch = *c->p++;
        if (ch == '"')
            return out ? !out->failed : 1;
        if (ch < 0x20)
            return 0;
        if (ch != '\\') {
            if (out) buf_putc(out, ch);
            continue;
        }
        if (c->p >= c->end)
            return 0;
        uint8_t esc = *c->p++;
        uint8_t lit;
        switch (esc) {
        case '"': lit = '"'; break;
        case '\\': lit = '\\'; break;
        case '/': lit = '/'; break;
        case 'b': lit = '\b'; break;
        case 'f': lit = '\f'; break;
        case 'n': lit = '\n'; break;
        case 'r': lit = '\r'; break;
        case 't': lit = '\t'; break;
        case 'u': {
            unsigned cp, lo;
            if (!hex4(c, &cp))
                return 0;
            if (cp >= 0xDC00 && cp <= 0xDFFF)
                return 0; /* a lone low surrogate */
            if (cp >= 0xD800 && cp <= 0xDBFF) {
                if (c->end - c->p < 2 || c->p[0] != '\\' || c->p[1] != 'u')
                    return 0;
                c->p += 2;
                if (!hex4(c, &lo) || lo < 0xDC00 || lo > 0xDFFF)
                    return 0;
                cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
            }
            if (out) put_utf8(out, cp);
            continue;
        }
        default:
            return 0;
        }
        if (out) buf_putc(out, lit);
    }
    return 0; /* unterminated */
}

/* Reads a JSON number (strict grammar) at the cursor. */
static int read_number(cursor_t *c, double *out) {
    char text[64];
    size_t n = 0;
    const uint8_t *start;
    skip_ws(c);
    start = c->p;
    if (peek(c) == '-') c->p++;
    if (peek(c) == '0') c->p++;
    else if (peek(c) >= '1' && peek(c) <= '9') while (peek(c) >= '0' && peek(c) <= '9') c->p++;
    else return 0;
    if (peek(c) == '.') {
        c->p++;
        if (!(peek(c) >= '0' && peek(c) <= '9')) return 0;
        while (peek(c) >= '0' && peek(c) <= '9') c->p++;
    }
    if (peek(c) == 'e' || peek(c) == 'E') {
        c->p++;
        if (peek(c) == '+' || peek(c) == '-') c->p++;
        if (!(peek(c) >= '0' && peek(c) <= '9')) return 0;
        while (peek(c) >= '0' && peek(c) <= '9') c->p++;
    }
    n = (size_t)(c->p - start);
    if (n >= sizeof text)
        return 0; /* absurdly long; refuse rather than truncate */
    memcpy(text, start, n);
    text[n] = '\0';
    *out = strtod(text, NULL);
    return isfinite(*out);
}

static int skip_value(cursor_t *c, int depth);

static int skip_literal(cursor_t *c, const char *word) {
    size_t n = strlen(word);
    if ((size_t)(c->end - c->p) < n || memcmp(c->p, word, n) != 0)
        return 0;
    c->p += n;
    return 1;
}

/* Skips any JSON value, refusing nesting deeper than MAX_DEPTH. */
static int skip_value(cursor_t *c, int depth) {
    double ignored;
    if (depth > MAX_DEPTH)
        return 0;
    skip_ws(c);
    switch (peek(c)) {
    case '"':
        return read_string(c, NULL);
    case '[':
        c->p++;
        if (eat(c, ']')) return 1;
        do {
            if (!skip_value(c, depth + 1)) return 0;
        } while (eat(c, ','));
        return eat(c, ']');
    case '{':
        c->p++;
        if (eat(c, '}')) return 1;
        do {
            if (!read_string(c, NULL) || !eat(c, ':') || !skip_value(c, depth + 1)) return 0;
        } while (eat(c, ','));
        return eat(c, '}');
    case 't': return skip_literal(c, "true");
    case 'f': return skip_literal(c, "false");
    case 'n': return skip_literal(c, "null");
    default:
        return read_number(c, &ignored);
    }
}

/* ------------------------------------------------------------------ arguments */

enum arg_type { ARG_OTHER, ARG_STRING, ARG_NUMBER };

typedef struct {
    enum arg_type type;
    double num;
    buf_t str;
} arg_t;

typedef struct {
    size_t count; /* may exceed MAX_ARGS: only the first MAX_ARGS are kept */
    arg_t items[MAX_ARGS];
} args_t;

static void args_release(args_t *a) {
    for (size_t i = 0; i < MAX_ARGS; i++)
        buf_release(&a->items[i].str);
}

/* Parses the positional-argument array; 0 when it is not exactly one JSON array. */
static int parse_args(const uint8_t *data, size_t len, args_t *a) {
    cursor_t c = {data, data + len};
    memset(a, 0, sizeof *a);
    if (!data && len)
        return 0;
    if (!eat(&c, '['))
        return 0;
    if (!eat(&c, ']')) {
        do {
            arg_t *slot = a->count < MAX_ARGS ? &a->items[a->count] : NULL;
            skip_ws(&c);
            int ch = peek(&c);
            if (slot && ch == '"') {
                slot->type = ARG_STRING;
                if (!read_string(&c, &slot->str)) return 0;
            } else if (slot && (ch == '-' || (ch >= '0' && ch <= '9'))) {
                slot->type = ARG_NUMBER;
                if (!read_number(&c, &slot->num)) return 0;
            } else if (!skip_value(&c, 1)) {
                return 0;
            }
            a->count++;
        } while (eat(&c, ','));
        if (!eat(&c, ']'))
            return 0;
    }
    skip_ws(&c);
    return c.p == c.end;
}

/* ------------------------------------------------------------------ answers */

/* Hands `b` to the host as *out, or reports allocation failure with no buffer at all. */
static int answer(buf_t *b, int status, uint8_t **out, size_t *out_len) {
    if (b->failed) {
        buf_release(b);
        *out = NULL;
        *out_len = 0;
        return status ? status : 1;
    }
    *out = b->data;
    *out_len = b->len;
    return status;
}

static int error(int code, const char *message, const char *detail, uint8_t **out,
                 size_t *out_len) {
    buf_t b = {0};
    char num[32];
    snprintf(num, sizeof num, "%d", code);
    buf_puts(&b, "{\"code\":");
    buf_puts(&b, num);
    buf_puts(&b, ",\"message\":\"");
    buf_put_escaped(&b, (const uint8_t *)message, strlen(message));
    if (detail)
        buf_put_escaped(&b, (const uint8_t *)detail, strlen(detail));
    buf_puts(&b, "\"}");
    return answer(&b, 1, out, out_len);
}

/* ------------------------------------------------------------------ plugin state and methods */

static uint8_t greeting[MAX_GREETING] = "Hello";
static size_t greeting_len = 5;

static int greet(const args_t *a, uint8_t **out, size_t *out_len) {
    if (a->count != 1 || a->items[0].type != ARG_STRING)
        return error(-32602, "greet takes one argument: a name (string)", NULL, out, out_len);
    buf_t b = {0};
    buf_putc(&b, '"');
    buf_put_escaped(&b, greeting, greeting_len);
    buf_puts(&b, ", ");
    buf_put_escaped(&b, a->items[0].str.data, a->items[0].str.len);
    buf_puts(&b, "!\"");
    return answer(&b, 0, out, out_len);
}

static int add(const args_t *a, uint8_t **out, size_t *out_len) {
    if (a->count != 2 || a->items[0].type != ARG_NUMBER || a->items[1].type != ARG_NUMBER)
        return error(-32602, "add takes two arguments: numbers", NULL, out, out_len);
    double sum = a->items[0].num + a->items[1].num;
    if (!isfinite(sum))
        return error(-32602, "add: the sum is not a finite number", NULL, out, out_len);
    char text[40];
    snprintf(text, sizeof text, "%.17g", sum);
    buf_t b = {0};
    buf_puts(&b, text);
    return answer(&b, 0, out, out_len);
}

static void crash(void) {
    /* Volatile twice over: the pointer, so the compiler cannot see it is NULL and turn the
     * store into a trap instruction (SIGILL); the target, so it cannot drop the store as
     * dead (GCC -O2 does, otherwise). This must be a genuine SIGSEGV. */
    volatile int *volatile nowhere = NULL;
    *nowhere = 42;
}

int sandboxer_call(const char *method, const uint8_t *args, size_t args_len, uint8_t **out,
                   size_t *out_len) {
    args_t a;
    int status;
    if (!out || !out_len)
        return 1;
    *out = NULL;
    *out_len = 0;
    if (!method)
        return error(-32600, "no method name", NULL, out, out_len);
    if (!parse_args(args, args_len, &a)) {
        args_release(&a);
        return error(-32602, "arguments are not a valid JSON array", NULL, out, out_len);
    }
    if (strcmp(method, "greet") == 0) {
        status = greet(&a, out, out_len);
    } else if (strcmp(method, "add") == 0) {
        status = add(&a, out, out_len);
    } else if (strcmp(method, "crash") == 0) {
        crash();
        status = error(-32603, "crash() did not crash", NULL, out, out_len);
    } else if (strcmp(method, "fail") == 0) {
        status = error(7, "fail() always fails", NULL, out, out_len);
    } else {
        status = error(-32601, "no such method: ", method, out, out_len);
    }
    args_release(&a);
    return status;
}

void sandboxer_free(uint8_t *ptr, size_t len) {
    (void)len;
    free(ptr);
}

/* Reads {"greeting": "..."} when present; any other key is skipped, anything malformed
 * (or a greeting that is not a string, or too long) fails init with a non-zero status. */
int sandboxer_init(const uint8_t *config, size_t len) {
    cursor_t c = {config, config + len};
    buf_t found = {0};
    int have = 0;
    if (!config && len)
        return 2;
    if (!eat(&c, '{'))
        return 2;
    if (!eat(&c, '}')) {
        do {
            buf_t key = {0};
            if (!read_string(&c, &key) || !eat(&c, ':')) {
                buf_release(&key);
                buf_release(&found);
                return 2;
            }
            int is_greeting = key.len == 8 && memcmp(key.data, "greeting", 8) == 0;
            buf_release(&key);
            if (is_greeting) {
                buf_release(&found);
                skip_ws(&c);
                if (peek(&c) != '"' || !read_string(&c, &found)) {
                    buf_release(&found);
                    return 3;
                }
                have = 1;
            } else if (!skip_value(&c, 1)) {
                buf_release(&found);
                return 2;
            }
        } while (eat(&c, ','));
        if (!eat(&c, '}')) {
            buf_release(&found);
            return 2;
        }
    }
    skip_ws(&c);
    if (c.p != c.end) {
        buf_release(&found);
        return 2;
    }
    if (have) {
        if (found.len > sizeof greeting) {
            buf_release(&found);
            return 4;
        }
        if (found.len)
            memcpy(greeting, found.data, found.len);
        greeting_len = found.len;
    }
    buf_release(&found);
    return 0;
}

int sandboxer_health(void) { return 0; }

int sandboxer_shutdown(void) { return 0; }

const char *sandboxer_methods(void) { return "[\"greet\",\"add\",\"crash\",\"fail\"]"; }
