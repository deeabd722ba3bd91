/*
 * hello: prints a greeting and a newline.
 *
 *   hello          prints the greeting compiled in with -DGREETING='"..."'
 *   hello TEXT...  prints TEXT instead (arguments joined by single spaces)
 *
 * The kiln pipeline (../pipeline.toml) compiles the `greeting` parameter in, so the parameter
 * given at submit time is part of what gets built, and of its provenance.
 */
#include <stdio.h>

#ifndef GREETING
/* No silent default: the pipeline must pass its parameter through. */
#error "compile with -DGREETING='\"text\"'"
#endif

int main(int argc, char **argv)
{
    if (argc > 1) {
        for (int i = 1; i < argc; i++) {
            if (fputs(argv[i], stdout) == EOF || (i + 1 < argc && putchar(' ') == EOF)) {
                perror("hello: write");
                return 1;
            }
        }
        if (putchar('\n') == EOF) {
            perror("hello: write");
            return 1;
        }
    } else if (puts(GREETING) == EOF) {
        perror("hello: write");
        return 1;
    }
    /* A full disk or closed pipe shows up only at flush: report it, do not exit 0. */
    if (fflush(stdout) == EOF) {
        perror("hello: write");
        return 1;
    }
    return 0;
}
